"""Dynamic batcher: one bounded queue, one future per request, one consumer task per variant.

Rules (DESIGN §4):
- A batch starts with the first queued request and closes when `max_batch_size` requests
  are in it or `max_wait_s` has passed since that first request. With `max_wait_s = 0` the
  batch is whatever is queued at that instant, so a lone request is never delayed.
- The queue is bounded: a full queue refuses at once (`QueueFullError` -> 429), it never grows.
- Requests whose deadline passed or whose caller went away (future cancelled) are dropped
  before inference; every other future is settled, with the batch's exception if it fails.
- Inference runs in a thread pool, off the event loop; at most `max_inflight_batches` run
  at once, so while one batch computes the next one fills.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

P = TypeVar("P")  # request payload
R = TypeVar("R")  # per-request result


class QueueFullError(Exception):
    """The variant's queue is full: retry after `retry_after_s`."""

    def __init__(self, variant: str, retry_after_s: float) -> None:
        super().__init__(f"variant {variant!r} is overloaded (queue full); retry later")
        self.retry_after_s = retry_after_s


class DeadlineError(Exception):
    """The request's deadline passed before it could be computed."""


class BatcherClosedError(Exception):
    """The batcher is shutting down and takes no new requests."""


@dataclass(slots=True)
class _Pending(Generic[P]):
    payload: P
    future: asyncio.Future[Any]
    enqueued_s: float
    deadline_s: float


@dataclass
class BatchObserver:
    """Hooks for metrics; the defaults do nothing (tests, benchmarks)."""

    queue_depth: Callable[[int], None] = lambda depth: None
    batch: Callable[[int, float], None] = lambda size, compute_s: None
    queue_wait: Callable[[float], None] = lambda wait_s: None
    dropped: Callable[[str], None] = lambda reason: None  # "deadline" | "cancelled"


@dataclass
class BatcherConfig:
    max_batch_size: int = 64
    max_wait_s: float = 0.002
    max_queue_size: int = 1024
    max_inflight_batches: int = 2
    retry_after_s: float = 1.0


@dataclass
class DynamicBatcher(Generic[P, R]):
    """Collects payloads into batches and runs `run_batch(payloads) -> results` in `executor`."""

    name: str
    run_batch: Callable[[Sequence[P]], Sequence[R]]
    executor: Executor
    config: BatcherConfig = field(default_factory=BatcherConfig)
    observer: BatchObserver = field(default_factory=BatchObserver)

    def __post_init__(self) -> None:
        self._queue: collections.deque[_Pending[P]] = collections.deque()
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(self.config.max_inflight_batches)
        self._inflight: set[asyncio.Task[None]] = set()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._consume(), name=self.name)

    @property
    def depth(self) -> int:
        return len(self._queue)

    async def submit(self, payload: P, timeout_s: float) -> R:
        """Queue one request and wait for its result (raises what its batch raised)."""
        if self._closing:
            raise BatcherClosedError(f"variant {self.name!r} is shutting down")
        if len(self._queue) >= self.config.max_queue_size:
            raise QueueFullError(self.name, self.config.retry_after_s)
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        future: asyncio.Future[R] = loop.create_future()
        self._queue.append(_Pending(payload, future, now, now + timeout_s))
        self.observer.queue_depth(len(self._queue))
        self._wakeup.set()
        # A bare timer on the future, not `asyncio.timeout`: that one cancels and uncancels
        # the task, a cost every request paid under load (profiled).
        timer = loop.call_later(timeout_s, self._expire, future, timeout_s)
        try:
            return await future
        finally:
            timer.cancel()

    def _expire(self, future: asyncio.Future[Any], timeout_s: float) -> None:
        if not future.done():
            self.observer.dropped("deadline")
            future.set_exception(DeadlineError(f"no result within {timeout_s:.3f} s"))

    async def _next_batch(self) -> list[_Pending[P]]:
        while not self._queue:
            self._wakeup.clear()
            await self._wakeup.wait()
        first_s = self._queue[0].enqueued_s
        limit = self.config.max_batch_size
        while len(self._queue) < limit and not self._closing:
            remaining_s = first_s + self.config.max_wait_s - time.perf_counter()
            if remaining_s <= 0:
                break
            self._wakeup.clear()
            try:
                async with asyncio.timeout(remaining_s):
                    await self._wakeup.wait()
            except TimeoutError:
                break
        n = min(limit, len(self._queue))
        return [self._queue.popleft() for _ in range(n)]

    def _live(self, batch: list[_Pending[P]]) -> list[_Pending[P]]:
        now = time.perf_counter()
        live = []
        for item in batch:
            if item.future.done():  # caller gone: its await was cancelled or timed out
                if item.deadline_s > now:  # a timed-out caller was counted as "deadline"
                    self.observer.dropped("cancelled")
            elif item.deadline_s <= now:
                item.future.set_exception(DeadlineError("deadline passed in the queue"))
                self.observer.dropped("deadline")
            else:
                self.observer.queue_wait(now - item.enqueued_s)
                live.append(item)
        return live

    async def _consume(self) -> None:
        while True:
            # Take a slot before forming the batch: while every slot computes, requests keep
            # queueing (bigger next batch), and none is taken out to wait where a deadline
            # or a cancellation could no longer be honoured.
            await self._slots.acquire()
            batch = await self._next_batch()
            self.observer.queue_depth(len(self._queue))
            live = self._live(batch)
            if not live:
                self._slots.release()
                continue
            task = asyncio.get_running_loop().create_task(self._run(live))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _run(self, batch: list[_Pending[P]]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            results = await loop.run_in_executor(
                self.executor, self.run_batch, [item.payload for item in batch]
            )
            if len(results) != len(batch):
                raise RuntimeError(f"engine returned {len(results)} results for {len(batch)}")
        except BaseException as exc:  # every caller must hear about a failed batch
            log.exception("variant %s: batch of %d failed", self.name, len(batch))
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            for item, result in zip(batch, results, strict=True):
                if not item.future.done():
                    item.future.set_result(result)
        finally:
            self._slots.release()
            self.observer.batch(len(batch), time.perf_counter() - started)

    async def close(self, drain_timeout_s: float = 10.0) -> None:
        """Stop taking requests, finish what is queued and in flight, then stop."""
        self._closing = True
        self._wakeup.set()
        deadline = time.perf_counter() + drain_timeout_s
        while (self._queue or self._inflight) and time.perf_counter() < deadline:
            await asyncio.sleep(0.005)
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(BatcherClosedError(f"variant {self.name!r} closed"))
        self._queue.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
