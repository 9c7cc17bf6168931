"""Variant routing: weighted, sticky per user, overridable.

A user's slot is `blake2b(salt + user_id)` mapped to [0, 1): stable across processes and
replicas (Python's `hash` is salted per process), so a user sees the same variant on every
call and every replica; changing the salt reshuffles users for a new experiment.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random


class UnknownVariantError(LookupError):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"unknown variant {name!r}; known variants: {', '.join(known)}")


class Router:
    def __init__(self, weights: dict[str, float], salt: str, seed: int | None = None) -> None:
        self.salt = salt.encode()
        self._random = random.Random(seed)
        self.set_weights(weights)

    def set_weights(self, weights: dict[str, float]) -> None:
        """Replace the split; at least one weight must be positive."""
        if not weights:  # no variants configured: the service is alive but not ready
            self.weights, self._names, self._edges = {}, [], []
            return
        bad = {k: w for k, w in weights.items() if not w >= 0}  # also refuses NaN
        if bad:
            raise ValueError(f"weights must be >= 0, got {bad}")
        total = sum(weights.values())
        if total <= 0:
            raise ValueError(f"at least one weight must be > 0, got {weights}")
        if not math.isfinite(total):  # 1e308 + 1e308: every share would be 0 or NaN
            raise ValueError(f"weights must be finite and sum to a finite number, got {weights}")
        names = sorted(weights)
        edges, acc = [], 0.0
        for name in names:
            acc += weights[name] / total
            edges.append(acc)
        edges[-1] = 1.0
        self.weights = {name: weights[name] / total for name in names}
        self._names, self._edges = names, edges

    def slot(self, user_id: str) -> float:
        digest = hashlib.blake2b(self.salt + b"\x00" + user_id.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64

    def assign(self, user_id: str, override: str | None = None) -> str:
        """The variant for this user; `override` (header or body) wins when it is known."""
        if override is not None or not self._names:
            if override is None or override not in self.weights:
                raise UnknownVariantError(override or "(none configured)", self._names)
            return override
        index = bisect.bisect_right(self._edges, self.slot(user_id))
        # bisect_right skips the empty intervals of zero-weight variants.
        return self._names[min(index, len(self._names) - 1)]

    def sample(self, fraction: float) -> bool:
        """True for about `fraction` of calls (shadow traffic)."""
        return fraction > 0 and self._random.random() < fraction
