"""Dynamic batcher: fills, waits from the first request, never delays a lone request with
zero wait, settles every future on failure, skips cancelled callers, refuses when full,
enforces deadlines. Plain asyncio.run: no cluster, no plugin."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from app.batching import (
    BatcherConfig,
    BatchObserver,
    DeadlineError,
    DynamicBatcher,
    QueueFullError,
)


class Recorder:
    """A run_batch that records batch sizes, optionally blocks, fails or sleeps."""

    def __init__(self, sleep_s: float = 0.0, fail: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.sleep_s, self.fail = sleep_s, fail
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, payloads: Sequence[int]) -> list[int]:
        self.gate.wait(5)
        self.batches.append(list(payloads))
        if self.sleep_s:
            time.sleep(self.sleep_s)
        if self.fail:
            raise ValueError("engine exploded")
        return [p * 10 for p in payloads]


def run(coro_fn, recorder: Recorder, **config):  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        with ThreadPoolExecutor(4) as pool:
            dropped: list[str] = []
            batcher = DynamicBatcher(
                "v", recorder, pool, BatcherConfig(**config), BatchObserver(dropped=dropped.append)
            )
            batcher.start()
            try:
                return await coro_fn(batcher), dropped
            finally:
                recorder.gate.set()
                await batcher.close(drain_timeout_s=2)

    return asyncio.run(main())


def test_queued_requests_fill_batches_up_to_max_size() -> None:
    rec = Recorder()
    rec.gate.clear()  # hold the engine so requests pile up

    async def scenario(b):  # type: ignore[no-untyped-def]
        tasks = [asyncio.create_task(b.submit(i, 5.0)) for i in range(10)]
        await asyncio.sleep(0.05)
        rec.gate.set()
        return await asyncio.gather(*tasks)

    results, _ = run(scenario, rec, max_batch_size=4, max_wait_s=0.0, max_inflight_batches=1)
    assert results == [i * 10 for i in range(10)]
    assert max(len(b) for b in rec.batches) == 4
    assert sorted(x for b in rec.batches for x in b) == list(range(10))


def test_wait_is_counted_from_the_first_request() -> None:
    rec = Recorder()

    async def scenario(b):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        first = asyncio.create_task(b.submit(1, 5.0))
        await asyncio.sleep(0.1)
        second = asyncio.create_task(b.submit(2, 5.0))
        await asyncio.gather(first, second)
        return time.perf_counter() - t0

    elapsed, _ = run(scenario, rec, max_batch_size=8, max_wait_s=0.2)
    assert rec.batches == [[1, 2]]  # the late request joined the open batch
    assert 0.18 <= elapsed < 0.29  # closed 0.2 s after the FIRST request, not the second


def test_zero_wait_never_delays_a_lone_request() -> None:
    rec = Recorder()

    async def scenario(b):  # type: ignore[no-untyped-def]
        await b.submit(0, 5.0)  # first call pays thread start-up
        t0 = time.perf_counter()
        await b.submit(1, 5.0)
        return time.perf_counter() - t0

    elapsed, _ = run(scenario, rec, max_batch_size=64, max_wait_s=0.0)
    assert elapsed < 0.02


def test_a_failed_batch_reaches_every_caller_and_the_next_batch_succeeds() -> None:
    rec = Recorder(fail=True)
    rec.gate.clear()

    async def scenario(b):  # type: ignore[no-untyped-def]
        tasks = [asyncio.create_task(b.submit(i, 5.0)) for i in range(5)]
        await asyncio.sleep(0.02)
        rec.gate.set()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        rec.fail = False
        return outcomes, await b.submit(7, 5.0)

    (outcomes, after), _ = run(scenario, rec, max_batch_size=8, max_wait_s=0.0)
    assert all(isinstance(o, ValueError) for o in outcomes)
    assert after == 70


def test_cancelled_requests_are_skipped() -> None:
    rec = Recorder()
    rec.gate.clear()

    async def scenario(b):  # type: ignore[no-untyped-def]
        blocker = asyncio.create_task(b.submit(0, 5.0))  # occupies the only slot
        await asyncio.sleep(0.02)
        gone = asyncio.create_task(b.submit(1, 5.0))
        kept = asyncio.create_task(b.submit(2, 5.0))
        await asyncio.sleep(0.02)
        gone.cancel()
        await asyncio.sleep(0.01)
        rec.gate.set()
        return await asyncio.gather(blocker, kept)

    results, dropped = run(scenario, rec, max_batch_size=8, max_wait_s=0.0, max_inflight_batches=1)
    assert results == [0, 20]
    assert [1] not in rec.batches and all(1 not in b for b in rec.batches)
    assert dropped == ["cancelled"]


def test_a_full_queue_refuses_at_once() -> None:
    rec = Recorder()
    rec.gate.clear()

    async def scenario(b):  # type: ignore[no-untyped-def]
        first = asyncio.create_task(b.submit(0, 5.0))
        await asyncio.sleep(0.02)  # taken by the consumer, engine blocked
        queued = [asyncio.create_task(b.submit(i, 5.0)) for i in (1, 2)]
        await asyncio.sleep(0.01)
        t0 = time.perf_counter()
        with pytest.raises(QueueFullError) as info:
            await b.submit(3, 5.0)
        refused_s = time.perf_counter() - t0
        rec.gate.set()
        await asyncio.gather(first, *queued)
        return refused_s, info.value.retry_after_s

    (refused_s, retry_after_s), _ = run(
        scenario, rec, max_batch_size=1, max_wait_s=0.0, max_queue_size=2, max_inflight_batches=1
    )
    assert refused_s < 0.005 and retry_after_s > 0


def test_deadline_is_enforced_in_the_queue_and_during_compute() -> None:
    rec = Recorder(sleep_s=0.3)

    async def scenario(b):  # type: ignore[no-untyped-def]
        slow = asyncio.create_task(b.submit(0, 0.1))  # compute outlives its deadline
        await asyncio.sleep(0.01)
        waiting = asyncio.create_task(b.submit(1, 0.05))  # expires while the engine is busy
        return await asyncio.gather(slow, waiting, return_exceptions=True)

    outcomes, dropped = run(scenario, rec, max_batch_size=1, max_wait_s=0.0, max_inflight_batches=1)
    assert all(isinstance(o, DeadlineError) for o in outcomes)
    assert rec.batches == [[0]]  # the expired request never reached the engine
    assert dropped.count("deadline") >= 2
