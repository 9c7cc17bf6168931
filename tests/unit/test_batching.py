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
            # The recorder blocks on its gate: compute in the pool, never on the loop.
            config.setdefault("inline_when_idle", False)
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


# -- batch only while busy -----------------------------------------------------------------------


def test_a_lone_request_goes_at_once_and_batches_form_while_the_engine_is_busy() -> None:
    """Slot free: the first request is its own batch with no wait (even with max_wait_s=0 a
    timer-based batcher would hold it). Slot busy: the next ones queue and leave together."""
    rec = Recorder()
    rec.gate.clear()

    async def scenario(b):  # type: ignore[no-untyped-def]
        first = asyncio.create_task(b.submit(1, 5.0))
        await asyncio.sleep(0.05)  # the first is in the engine (held by the gate)
        assert b.depth == 0
        rest = [asyncio.create_task(b.submit(i, 5.0)) for i in range(2, 7)]
        await asyncio.sleep(0.05)
        assert b.depth == 5  # the only slot is busy: they wait together
        rec.gate.set()
        return await asyncio.gather(first, *rest)

    results, _ = run(scenario, rec, max_batch_size=8, max_inflight_batches=1)
    assert results == [10, 20, 30, 40, 50, 60]
    assert rec.batches == [[1], [2, 3, 4, 5, 6]]


def test_the_default_policy_has_no_timer() -> None:
    assert BatcherConfig().max_wait_s == 0.0


# -- dead requests leave the accounting ------------------------------------------------------------


def test_cancelled_and_expired_requests_stop_counting_at_once() -> None:
    """A full queue of requests whose callers left must not refuse new work."""
    rec = Recorder()
    rec.gate.clear()

    async def scenario(b):  # type: ignore[no-untyped-def]
        blocker = asyncio.create_task(b.submit(0, 5.0))
        await asyncio.sleep(0.02)
        gone = [asyncio.create_task(b.submit(i, 5.0)) for i in range(1, 5)]
        short = [asyncio.create_task(b.submit(i, 0.05)) for i in range(5, 9)]
        await asyncio.sleep(0.02)
        assert b.depth == 8 and b.full
        with pytest.raises(QueueFullError):
            await b.submit(99, 5.0)
        for t in gone:
            t.cancel()
        await asyncio.sleep(0.001)
        assert b.depth == 4  # cancelled ones left at once, not when the consumer reaches them
        await asyncio.sleep(0.1)  # the short deadlines expire
        assert b.depth == 0 and not b.full
        kept = [asyncio.create_task(b.submit(i, 5.0)) for i in range(10, 18)]
        await asyncio.sleep(0.01)
        assert b.depth == 8
        rec.gate.set()
        out = await asyncio.gather(blocker, *kept)
        for t in short:
            with pytest.raises(DeadlineError):
                await t
        return out

    results, dropped = run(
        scenario, rec, max_batch_size=8, max_queue_size=8, max_inflight_batches=1
    )
    assert results == [0, *range(100, 180, 10)]
    assert sorted(dropped) == ["cancelled"] * 4 + ["deadline"] * 4
    assert all(p not in b for b in rec.batches for p in range(1, 9))  # dead ones never ran


def test_the_admission_limit_follows_the_measured_engine_speed() -> None:
    """Refuse what cannot be drained within max_queue_delay_s: 20 ms per request and a 0.5 s
    budget admit 25 waiting requests, not max_queue_size. (Slots do not multiply it: the
    drain rate is measured as wall time per finished request, which is what two batches
    sharing one core really deliver.)"""
    rec = Recorder(sleep_s=0.02)

    async def scenario(b):  # type: ignore[no-untyped-def]
        for i in range(12):
            await b.submit(i, 5.0)  # one at a time: batches of 1, ~20 ms each
        return b.limit

    limit, _ = run(
        scenario, rec, max_batch_size=4, max_queue_size=1000, max_inflight_batches=2,
        max_queue_delay_s=0.5,
    )  # fmt: skip
    assert 18 <= limit <= 28  # 0.5 s / 0.02 s = 25, with the EWMA still converging


# -- supervised consumer ---------------------------------------------------------------------------


def test_a_crashed_consumer_is_reported_counted_and_restarted() -> None:
    rec = Recorder()
    restarts: list[int] = []

    async def main():  # type: ignore[no-untyped-def]
        with ThreadPoolExecutor(4) as pool:
            observer = BatchObserver(restarted=lambda: restarts.append(1))
            config = BatcherConfig(restart_backoff_s=0.2, inline_when_idle=False)
            b = DynamicBatcher("v", rec, pool, config, observer)
            original = b._next_batch
            calls = {"n": 0}

            async def crash_once():  # type: ignore[no-untyped-def]
                calls["n"] += 1
                if calls["n"] == 1:
                    raise RuntimeError("consumer bug")
                return await original()

            b._next_batch = crash_once  # type: ignore[method-assign]
            b.start()
            pending = asyncio.create_task(b.submit(3, 5.0))
            await asyncio.sleep(0.05)
            seen = (b.healthy, b.failure)
            result = await pending  # queued requests survive the crash
            healthy_after = b.healthy
            await b.close(drain_timeout_s=1)
            return seen, result, healthy_after

    (healthy, failure), result, healthy_after = asyncio.run(main())
    assert not healthy and "consumer bug" in failure
    assert result == 30 and healthy_after and restarts == [1]


# -- shadow lane -----------------------------------------------------------------------------------


def test_shadow_requests_never_take_live_capacity() -> None:
    """Shadow work does not count toward admission, never runs while live work waits, and
    is dropped (None) when its own lane is full."""
    rec = Recorder()
    rec.gate.clear()
    dropped_shadow: list[int] = []

    async def main():  # type: ignore[no-untyped-def]
        with ThreadPoolExecutor(4) as pool:
            observer = BatchObserver(shadow_dropped=lambda: dropped_shadow.append(1))
            config = BatcherConfig(
                max_batch_size=4,
                max_queue_size=4,
                max_inflight_batches=1,
                shadow_queue_size=2,
                inline_when_idle=False,
            )
            b = DynamicBatcher("v", rec, pool, config, observer)
            b.start()
            live0 = asyncio.create_task(b.submit(1, 5.0))  # occupies the only live slot
            await asyncio.sleep(0.02)
            live = [asyncio.create_task(b.submit(i, 5.0)) for i in range(2, 6)]
            await asyncio.sleep(0.02)
            shadows = [asyncio.create_task(b.submit_shadow(100 + i, 5.0)) for i in range(3)]
            await asyncio.sleep(0.02)
            depth, full = b.depth, b.full
            assert len(b._shadow) == 2  # not dispatched while live requests wait
            rec.gate.set()
            out = await asyncio.gather(live0, *live, *shadows)
            await b.close(drain_timeout_s=1)
            return depth, full, out

    depth, full, out = asyncio.run(main())
    assert depth == 4 and full  # the 4 live ones; the 2 queued shadows do not count
    assert out[:5] == [10, 20, 30, 40, 50]
    assert sorted(x for x in out[5:] if x is not None) == [1000, 1010] and None in out[5:]
    assert dropped_shadow == [1]
    assert [1] in rec.batches and [2, 3, 4, 5] in rec.batches and [100, 101] in rec.batches


def test_a_lone_request_on_an_idle_engine_is_computed_on_the_loop() -> None:
    """No thread hand-off for a lone request on an idle engine; batches still go to the pool."""
    threads: list[str] = []

    def record(payloads: Sequence[int]) -> list[int]:
        threads.append(threading.current_thread().name)
        time.sleep(0.02)
        return [p * 10 for p in payloads]

    async def main():  # type: ignore[no-untyped-def]
        with ThreadPoolExecutor(2, thread_name_prefix="pool") as pool:
            b = DynamicBatcher("v", record, pool, BatcherConfig(max_inflight_batches=1))
            b.start()
            alone = await b.submit(1, 5.0)
            together = await asyncio.gather(*(b.submit(i, 5.0) for i in range(2, 6)))
            await b.close(drain_timeout_s=1)
            return alone, together

    alone, together = asyncio.run(main())
    assert alone == 10 and together == [20, 30, 40, 50]
    assert threads[0] == threading.main_thread().name
    assert any(t.startswith("pool") for t in threads[1:])  # a batch of several went out
