"""The event-loop lag metric sees a blocked loop, and stays near zero on an idle one."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from app.main import watch_loop_lag
from app.metrics import Metrics


def lag_sum_and_count(metrics: Metrics) -> tuple[float, float]:
    samples = {s.name: s.value for s in metrics.loop_lag.collect()[0].samples}
    return samples["recsys_event_loop_lag_seconds_sum"], samples[
        "recsys_event_loop_lag_seconds_count"
    ]


def test_a_blocked_loop_shows_as_lag() -> None:
    metrics = Metrics()

    async def scenario() -> None:
        watcher = asyncio.create_task(watch_loop_lag(SimpleNamespace(metrics=metrics), 0.01))
        await asyncio.sleep(0.05)  # idle: the timer fires on time
        idle_sum, idle_count = lag_sum_and_count(metrics)
        assert idle_count >= 2 and idle_sum / idle_count < 0.01
        time.sleep(0.2)  # a blocking call on the loop, e.g. work that should be in a thread
        await asyncio.sleep(0.03)
        watcher.cancel()

    asyncio.run(scenario())
    total, _ = lag_sum_and_count(metrics)
    assert total >= 0.15
