"""Refusal pacing (app/overload.py): first refusals go at once, retries that come right back
share a pace tied to the served rate, and what is remembered stays bounded."""

from __future__ import annotations

import itertools

import pytest

import app.overload as overload
from app.overload import RefusalPacer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(overload.time, "monotonic", c)
    return c


def test_first_refusals_and_spaced_ones_are_never_held(clock: Clock) -> None:
    """Open-loop overload: many connections, each refused now and then, never waits."""
    pacer = RefusalPacer(lambda: 100.0)
    for _ in range(5):
        for conn in range(1000):
            assert pacer.delay_s(("10.0.0.1", conn)) == 0.0
        clock.now += overload.RETRY_WINDOW_S * 1.5  # each connection comes back later


def test_immediate_retries_are_paced_at_the_served_rate(clock: Clock) -> None:
    """A storm: every connection resends at once. Past the burst, retries leave at
    RETRIES_PER_SERVED x the served rate: each one holds a little longer than the last."""
    served = 100.0
    pacer = RefusalPacer(lambda: served)
    conns = [("10.0.0.2", i) for i in range(50)]
    for _ in range(overload.RETRY_STREAK):  # first refusals, and a few quick resends
        for c in conns:
            assert pacer.delay_s(c) == 0.0
        clock.now += 0.001
    delays = [pacer.delay_s(c) for c in conns]  # they keep coming right back: a storm
    pace_s = 1.0 / (overload.RETRIES_PER_SERVED * served)
    burst = int(overload.BURST_S / pace_s)
    assert all(d == 0.0 for d in delays[:burst])
    held = delays[burst + 1 :]
    assert held and all(b > a for a, b in itertools.pairwise(held))
    assert held[-1] == pytest.approx((len(delays) - 1) * pace_s - overload.BURST_S, abs=0.01)


def test_a_client_that_fell_behind_and_resends_once_or_twice_is_not_held(clock: Clock) -> None:
    pacer = RefusalPacer(lambda: 1.0)  # a slow engine: any pacing would show
    for _ in range(20):
        for _quick in range(overload.RETRY_STREAK):  # catching up: sends right after answers
            assert pacer.delay_s(("c", 1)) == 0.0
            clock.now += 0.001
        clock.now += 0.45  # then back on its own schedule


def test_holds_never_exceed_the_retry_after_and_memory_is_bounded(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(overload, "MAX_TRACKED", 100)
    pacer = RefusalPacer(lambda: 0.0)  # nothing served: the minimum pace applies
    assert pacer.rate_per_s == overload.MIN_RETRIES_PER_S
    for _ in range(3):
        for i in range(500):
            assert 0.0 <= pacer.delay_s(("h", i % 10)) <= overload.MAX_DELAY_S
    for i in range(1000):
        pacer.delay_s(("other", i))
    assert len(pacer._answered) <= 100
