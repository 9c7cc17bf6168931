"""Dynamic batcher: one queue, one future per request, one supervised consumer per variant.

Policy (DESIGN §4): **batch only while the engine is busy.** The consumer takes an inference
slot first, then forms a batch of whatever is queued at that instant (up to
`max_batch_size`). A lone request at low load finds a free slot and goes at once, paying the
model's latency and nothing else; under load every slot computes, requests accumulate, and
the next free slot takes them as one batch, so batch size follows load without a timer.
(`max_wait_s > 0` optionally lets a batch wait that long from its first request for company.)

Admission: only live requests count. A request whose deadline passed or whose caller went
away leaves the accounting at once (its queue entry is skipped when reached), so refusals
never happen for capacity nobody uses. The limit adapts to the engine's measured speed: a
request is refused (429) when the live queue already holds more than the engine drains in
`max_queue_delay_s`, so what is accepted finishes well inside its deadline instead of
timing out (goodput under overload), capped by `max_queue_size`.

Shadow requests have their own bounded lane and their own slot: they run only while no live
request is queued, never take a live slot, never count toward live admission, and are
dropped (counted) rather than ever delaying or refusing a live request.

The consumer is supervised: if it crashes the error is logged and counted, `healthy` turns
False (readiness reports it), and it restarts; requests queued meanwhile are kept.
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
    """The variant cannot take more work now: retry after `retry_after_s`."""

    def __init__(self, variant: str, retry_after_s: float) -> None:
        super().__init__(f"variant {variant!r} is overloaded (queue full); retry later")
        self.retry_after_s = retry_after_s


class DeadlineError(Exception):
    """The request's deadline passed before it could be computed."""


class BatcherClosedError(Exception):
    """The batcher is shutting down and takes no new requests."""


@dataclass(slots=True, eq=False)
class _Pending(Generic[P]):
    payload: P
    future: asyncio.Future[Any]
    enqueued_s: float
    deadline_s: float
    queued: bool = True  # still counted as live queue work


@dataclass
class BatchObserver:
    """Hooks for metrics; the defaults do nothing (tests, benchmarks)."""

    queue_depth: Callable[[int], None] = lambda depth: None
    batch: Callable[[int, float], None] = lambda size, compute_s: None
    queue_wait: Callable[[float], None] = lambda wait_s: None
    dropped: Callable[[str], None] = lambda reason: None  # "deadline" | "cancelled"
    queue_limit: Callable[[int], None] = lambda limit: None
    restarted: Callable[[], None] = lambda: None
    shadow_dropped: Callable[[], None] = lambda: None
    health: Callable[[bool], None] = lambda ok: None  # the consumer stopped / runs again


@dataclass
class BatcherConfig:
    max_batch_size: int = 32
    max_wait_s: float = 0.0
    max_queue_size: int = 1024
    max_inflight_batches: int = 2
    max_queue_delay_s: float = 0.25
    shadow_queue_size: int = 64
    retry_after_s: float = 1.0
    restart_backoff_s: float = 0.05
    inline_when_idle: bool = True  # a lone request on an idle engine runs on the loop


# Until the first batches are measured the adaptive limit assumes this per-request cost.
_INITIAL_PER_REQUEST_S = 0.001
SHADOW_BATCH_SIZE = 4
_EWMA = 0.2  # weight of the newest batch in the per-request cost estimate


@dataclass
class DynamicBatcher(Generic[P, R]):
    """Collects payloads into batches and runs `run_batch(payloads) -> results` in `executor`."""

    name: str
    run_batch: Callable[[Sequence[P]], Sequence[R]]
    executor: Executor
    config: BatcherConfig = field(default_factory=BatcherConfig)
    observer: BatchObserver = field(default_factory=BatchObserver)
    # Where shadow batches run (the service's idle-priority thread); None: `executor`.
    shadow_executor: Executor | None = None

    def __post_init__(self) -> None:
        self._queue: collections.deque[_Pending[P]] = collections.deque()
        self._shadow: collections.deque[_Pending[P]] = collections.deque()
        self._live = 0  # queued entries whose caller still waits
        self._callers = 0  # live requests waiting for a result, queued or computing
        self._wakeup = asyncio.Event()
        self._shadow_wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(self.config.max_inflight_batches)
        self._inflight: set[asyncio.Task[None]] = set()
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []
        self._per_request_s = _INITIAL_PER_REQUEST_S  # engine time per request, measured
        self.limit = self._limit_now()  # live requests admitted now (updated per batch)
        self._last_done_s = 0.0  # when the latest live batch finished
        self.failure: str | None = None  # why the consumer is not running, while restarting

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._supervise(self._consume), name=self.name),
            loop.create_task(self._supervise(self._consume_shadow), name=f"{self.name}-shadow"),
        ]

    # -- accounting -----------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Live queued requests (expired and cancelled ones are not counted)."""
        return self._live

    def _limit_now(self) -> int:
        """How many live requests may wait: what the engine drains in `max_queue_delay_s`."""
        c = self.config
        admitted = int(self.drain_per_s * c.max_queue_delay_s)
        return max(c.max_batch_size, min(c.max_queue_size, admitted))

    def _measured(self, size: int, started_s: float) -> None:
        """Update the engine's cost per request from a finished live batch.

        The cost is the wall time this batch added since the previous one finished (or since
        it started, if the engine was idle), per request: with several batches in flight on
        shared cores that is the real drain rate, not one batch's compute time (measured in
        a retry storm: counting 2 slots as twice the speed admitted twice what could be
        served in time, and half the computed answers came after their deadline)."""
        now = time.perf_counter()
        interval_s = now - max(started_s, self._last_done_s)
        self._last_done_s = now
        self._per_request_s += _EWMA * (interval_s / size - self._per_request_s)
        # Kept as a plain attribute: every request (and every refusal) reads it.
        self.limit = self._limit_now()
        self.observer.queue_limit(self.limit)

    @property
    def drain_per_s(self) -> float:
        """Requests per second the engine finishes, as measured (`_measured`)."""
        return 1.0 / max(self._per_request_s, 1e-6)

    @property
    def full(self) -> bool:
        return self._live >= self.limit

    @property
    def healthy(self) -> bool:
        return self.failure is None

    def _left(self, item: _Pending[P]) -> None:
        """A queued request's caller is gone before dispatch: it no longer counts. (No done
        callback on every future: that was one more event-loop callback per request.)"""
        if item.queued:
            item.queued = False
            self._live -= 1
            if item.future.cancelled():  # the caller went away (an expiry was counted)
                self.observer.dropped("cancelled")
            self.observer.queue_depth(self._live)
            # Entries stay in the deque until reached; compact when most of it is dead.
            if len(self._queue) > 2 * self._live + 64:
                self._queue = collections.deque(i for i in self._queue if i.queued)

    # -- submitting -----------------------------------------------------------------------

    async def submit(self, payload: P, timeout_s: float) -> R:
        """Queue one request and wait for its result (raises what its batch raised)."""
        if self._closing:
            raise BatcherClosedError(f"variant {self.name!r} is shutting down")
        if self.full:
            raise QueueFullError(self.name, self.config.retry_after_s)
        item = self._enqueue(self._queue, payload, timeout_s)
        self._live += 1
        self.observer.queue_depth(self._live)
        self._wakeup.set()
        self._callers += 1
        try:
            return await self._wait(item, timeout_s)
        finally:
            self._callers -= 1
            # Still queued here means the caller went away (cancelled): stop counting it now.
            # (An expiry is uncounted by `_expire`; a result means it left the queue.)
            self._left(item)

    async def submit_shadow(self, payload: P, timeout_s: float) -> R | None:
        """Run a shadow copy when the engine has room; None when dropped (lane full)."""
        if self._closing or len(self._shadow) >= self.config.shadow_queue_size:
            self.observer.shadow_dropped()
            return None
        item = self._enqueue(self._shadow, payload, timeout_s)
        item.queued = False  # never live work
        self._shadow_wakeup.set()
        return await self._wait(item, timeout_s)

    def _enqueue(
        self, lane: collections.deque[_Pending[P]], payload: P, timeout_s: float
    ) -> _Pending[P]:
        now = time.perf_counter()
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        item = _Pending(payload, future, now, now + timeout_s)
        lane.append(item)
        return item

    async def _wait(self, item: _Pending[P], timeout_s: float) -> Any:
        # A bare timer on the future, not `asyncio.timeout`: that one cancels and uncancels
        # the task, a cost every request paid under load (profiled).
        timer = asyncio.get_running_loop().call_later(timeout_s, self._expire, item, timeout_s)
        try:
            return await item.future
        finally:
            timer.cancel()

    def _expire(self, item: _Pending[P], timeout_s: float) -> None:
        if not item.future.done():
            self.observer.dropped("deadline")
            item.future.set_exception(DeadlineError(f"no result within {timeout_s:.3f} s"))
            self._left(item)

    # -- consuming ------------------------------------------------------------------------

    async def _supervise(self, consume: Callable[[], Any]) -> None:
        """Run a consumer; on a crash log it, count it, report it, and start it again."""
        while True:
            try:
                await consume()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failure = f"batch consumer crashed ({type(exc).__name__}: {exc}); restarting"
                self.observer.health(False)
                log.exception("variant %s: batch consumer crashed; restarting", self.name)
                self.observer.restarted()
                await asyncio.sleep(self.config.restart_backoff_s)
                self.failure = None
                self.observer.health(True)

    def _pop(self, lane: collections.deque[_Pending[P]], n: int) -> list[_Pending[P]]:
        """Up to `n` entries whose caller still waits, in arrival order."""
        batch: list[_Pending[P]] = []
        while lane and len(batch) < n:
            item = lane.popleft()
            if item.future.done():  # expired, or cancelled before its caller's cleanup ran
                self._left(item)
                continue
            if item.queued:
                item.queued = False
                self._live -= 1
            batch.append(item)
        return batch

    async def _next_batch(self) -> list[_Pending[P]]:
        c = self.config
        while not self._live:
            if self._closing and not self._queue:
                return []
            self._wakeup.clear()
            await self._wakeup.wait()
        if c.max_wait_s > 0:
            first_s = next((i.enqueued_s for i in self._queue if i.queued), time.perf_counter())
            while self._live < c.max_batch_size and not self._closing:
                remaining_s = first_s + c.max_wait_s - time.perf_counter()
                if remaining_s <= 0:
                    break
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining_s):
                        await self._wakeup.wait()
        batch = self._pop(self._queue, c.max_batch_size)
        if not self._queue:
            self._shadow_wakeup.set()  # the live lane is empty: shadow work may go
        return batch

    def _started(self, batch: list[_Pending[P]]) -> list[_Pending[P]]:
        """Drop entries whose deadline passed; record the queue wait of the others."""
        now = time.perf_counter()
        live = []
        for item in batch:
            if item.deadline_s <= now:
                item.future.set_exception(DeadlineError("deadline passed in the queue"))
                self.observer.dropped("deadline")
            else:
                self.observer.queue_wait(now - item.enqueued_s)
                live.append(item)
        return live

    async def _consume(self) -> None:
        while True:
            # Take a slot before forming the batch: while every slot computes, requests keep
            # queueing (the next batch grows), and none leaves the queue to wait where a
            # deadline or a cancellation could no longer be honoured.
            await self._slots.acquire()
            batch: list[_Pending[P]] = []
            try:
                batch = await self._next_batch()
                batch = self._started(batch)
            except BaseException as exc:
                self._slots.release()
                # What was taken out of the queue must not wait for a deadline: settle it
                # now with the error (a 500 at once, not a 504 a second later).
                error = exc if isinstance(exc, Exception) else BatcherClosedError(self.name)
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(error)
                raise
            self.observer.queue_depth(self._live)
            if not batch:
                self._slots.release()
                if self._closing and not self._queue:
                    return
                continue
            if self._callers == 1 and not self._inflight and self.config.inline_when_idle:
                # The only request in the batcher, on an idle engine: compute it right here.
                # Handing it to a worker thread and back costs two thread wake-ups (~0.1-0.2
                # ms here), more than a small model's inference. Only when it is alone: with
                # company waiting, a loop busy computing would stop forming batches (measured
                # at 64 connections: every batch became 1 and throughput fell).
                self._run_inline(batch[0])
                continue
            task = asyncio.get_running_loop().create_task(self._run(batch, live=True))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _consume_shadow(self) -> None:
        """One shadow batch at a time, only while no live request waits."""
        while not self._closing:
            if not self._shadow or self._live:
                self._shadow_wakeup.clear()
                await self._shadow_wakeup.wait()
                continue
            # Small shadow batches: each is a slice of CPU the live path may want back soon.
            batch = self._started(self._pop(self._shadow, SHADOW_BATCH_SIZE))
            if batch:
                await self._run(batch, live=False)

    async def _run(self, batch: list[_Pending[P]], live: bool) -> None:
        started = time.perf_counter()
        executor = self.executor if live or self.shadow_executor is None else self.shadow_executor
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                executor, self.run_batch, [item.payload for item in batch]
            )
            self._settle(batch, results)
        except BaseException as exc:  # every caller must hear about a failed batch
            self._fail(batch, exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            if live:
                self._done(len(batch), started)

    def _run_inline(self, item: _Pending[P]) -> None:
        started = time.perf_counter()
        try:
            self._settle([item], self.run_batch([item.payload]))
        except Exception as exc:
            self._fail([item], exc)
        finally:
            self._done(1, started)

    def _settle(self, batch: list[_Pending[P]], results: Sequence[R]) -> None:
        if len(results) != len(batch):
            raise RuntimeError(f"engine returned {len(results)} results for {len(batch)}")
        for item, result in zip(batch, results, strict=True):
            if not item.future.done():
                item.future.set_result(result)

    def _fail(self, batch: list[_Pending[P]], exc: BaseException) -> None:
        log.exception("variant %s: batch of %d failed", self.name, len(batch), exc_info=exc)
        for item in batch:
            if not item.future.done():
                item.future.set_exception(exc)

    def _done(self, size: int, started_s: float) -> None:
        """A live batch finished: free its slot, record it, update the measured speed."""
        self._slots.release()
        self.observer.batch(size, time.perf_counter() - started_s)
        self._measured(size, started_s)

    async def close(self, drain_timeout_s: float = 10.0) -> None:
        """Stop taking requests, finish what is queued and in flight, then stop."""
        self._closing = True
        self._wakeup.set()
        self._shadow_wakeup.set()
        deadline = time.perf_counter() + drain_timeout_s
        while (self._live or self._inflight) and time.perf_counter() < deadline:
            await asyncio.sleep(0.005)
        for lane in (self._queue, self._shadow):
            for item in lane:
                if not item.future.done():
                    item.future.set_exception(BatcherClosedError(f"variant {self.name!r} closed"))
            lane.clear()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
