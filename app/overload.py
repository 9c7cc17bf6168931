"""Refusal pacing: under a retry storm, refusals themselves become the overload.

A client that resends at once after each 429 turns every refusal into another request. On
one core the event loop then spends its time refusing (each refusal costs ~50-60 µs of
parsing and answering) and the inference threads, which produce the only useful work,
starve: measured here, 512 such clients cut goodput to 0.3% of capacity
(docs/results/2026-12-06-serving-batcher.md).

A refusal on a connection whose last `RETRY_STREAK` refusals each came less than
`RETRY_WINDOW_S` after the previous answer is such a retry storm. (One or two quick resends
are not: an open-loop client that fell behind its schedule sends its next request at once,
and pacing it too made the open-loop test's refusal p99 33 ms instead of 7-10.)
Retries are answered at a pace tied to what the service serves (`RETRIES_PER_SERVED` times
the engines' measured drain rate, at least `MIN_RETRIES_PER_S`; GCRA, a virtual-time token
bucket); beyond it each waits its turn before it is sent. A waiting refusal costs a timer,
not CPU, and a client that resends at once can only resend after its answer: the storm
slows to the pace by itself (Little's law), and the CPU goes to accepted work. A first
refusal, and every refusal of open-loop overload (new requests at their own pace), is sent
at once. One cost: a proxy that multiplexes many users on few connections looks like a
retrying client while the service is saturated, and its refusals share the pace.
"""

from __future__ import annotations

import time
from collections.abc import Callable

RETRY_WINDOW_S = 0.1  # a refusal this soon after the previous answer on its connection
RETRY_STREAK = 3  # ... this many times in a row
RETRIES_PER_SERVED = 2.0
MIN_RETRIES_PER_S = 200.0
BURST_S = 0.05  # retries up to this much ahead of the pace still go at once
MAX_DELAY_S = 1.0  # never hold a refusal longer than the Retry-After it carries
MAX_TRACKED = 65_536  # connections remembered; older ones are forgotten first


class RefusalPacer:
    def __init__(self, served_per_s: Callable[[], float]) -> None:
        self._served_per_s = served_per_s
        self._tat = 0.0  # theoretical arrival time of the next paced retry (GCRA)
        # connection -> (when its last 429 went out, quick refusals in a row)
        self._answered: dict[object, tuple[float, int]] = {}

    @property
    def rate_per_s(self) -> float:
        return max(MIN_RETRIES_PER_S, RETRIES_PER_SERVED * self._served_per_s())

    def delay_s(self, connection: object) -> float:
        """How long this refusal waits before it is sent (0: at once)."""
        now = time.monotonic()
        last, streak = self._answered.pop(connection, (None, 0))
        streak = streak + 1 if last is not None and now - last < RETRY_WINDOW_S else 0
        delay = 0.0
        if streak >= RETRY_STREAK:
            tat = max(self._tat, now)
            delay = min(MAX_DELAY_S, max(0.0, tat - now - BURST_S))
            self._tat = min(tat + 1.0 / self.rate_per_s, now + BURST_S + MAX_DELAY_S)
        if len(self._answered) >= MAX_TRACKED:  # dicts keep insertion order: oldest first
            del self._answered[next(iter(self._answered))]
        self._answered[connection] = (now + delay, streak)
        return delay
