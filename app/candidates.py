"""Numpy bookkeeping shared by the two-stage scorers: exclusions, candidate pools, top-k.

All of it works on flat (row, item id) arrays for a whole batch at once: a Python loop per
request would hold the GIL the event loop needs, once per block of the catalogue.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Thresholds start here, never at -inf, so a masked score (-inf) never passes `>=`.
LOWEST = np.finfo(np.float32).min


class Exclusions:
    """The (row, item id) pairs a batch must never return: each row's history when asked.

    (The padding id 0 is masked by the scorers themselves.)"""

    def __init__(self, exclude: Sequence[np.ndarray | None], n_rows: int) -> None:
        self.batch = len(exclude)
        self.stride = int(n_rows)  # (row, id) -> row * stride + id, unique per pair
        parts = [
            np.unique(np.asarray(ids, dtype=np.int64)) + row * self.stride
            for row, ids in enumerate(exclude)
            if ids is not None and len(ids)
        ]
        self.keys = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)  # sorted
        rows, ids = np.divmod(self.keys, self.stride)
        self.counts = np.bincount(rows, minlength=self.batch)  # distinct excluded ids per row
        order = np.argsort(ids, kind="stable")
        self._rows, self._ids = rows[order], ids[order]  # by id, for `within`

    def within(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, ids) of the pairs with start <= id < stop."""
        lo, hi = np.searchsorted(self._ids, [start, stop])
        return self._rows[lo:hi], self._ids[lo:hi]

    def contains(self, rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Boolean mask: which (rows[i], ids[i]) pairs are excluded."""
        if not len(self.keys):
            return np.zeros(len(rows), dtype=bool)
        keys = rows.astype(np.int64) * self.stride + ids
        at = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return self.keys[at] == keys


def rank_within_rows(rows: np.ndarray, batch: int) -> np.ndarray:
    """Position of each entry among the entries of its row, for `rows` sorted by row."""
    counts = np.bincount(rows, minlength=batch)
    starts = np.cumsum(counts) - counts
    return np.arange(len(rows)) - starts[rows]


class CandidatePool:
    """Items that may still be in a row's top k, while a scan over the catalogue runs.

    Each candidate has an upper and a lower bound of its exact score (equal when the scan
    computes exact scores). A row's threshold is the k-th largest lower bound seen so far:
    at least k items score at least that much, so an item whose upper bound is below it can
    never be in the top k, ties included. Thresholds only rise.
    """

    def __init__(self, batch: int, k: int) -> None:
        self.batch, self.k = batch, k
        self.threshold = np.full(batch, LOWEST, dtype=np.float32)
        self._best = np.full((batch, 0), -np.inf, dtype=np.float32)  # up to k lower bounds
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def seed(self, lower: np.ndarray) -> None:
        """Raise thresholds from lower bounds `[batch, n]` of items that `add` will also see:
        they set a threshold only, so nothing is counted twice."""
        n = lower.shape[1]
        if n >= self.k:
            kth = np.partition(lower, n - self.k, axis=1)[:, n - self.k]
            np.maximum(self.threshold, kth, out=self.threshold)

    def add(self, rows: np.ndarray, ids: np.ndarray, upper: np.ndarray, lower: np.ndarray) -> None:
        """New candidates (each (row, id) at most once over the whole scan)."""
        if not len(rows):
            return
        self._parts.append((rows, ids, upper))
        order = np.argsort(rows, kind="stable")
        rows, lower = rows[order], lower[order]
        rank = rank_within_rows(rows, self.batch)
        fresh = np.full((self.batch, int(rank.max()) + 1), -np.inf, dtype=np.float32)
        fresh[rows, rank] = lower
        both = np.concatenate([self._best, fresh], axis=1)
        if both.shape[1] > self.k:
            both = np.partition(both, both.shape[1] - self.k, axis=1)[:, -self.k :]
        self._best = both
        if both.shape[1] == self.k:
            np.maximum(self.threshold, both.min(axis=1), out=self.threshold)

    def finalists(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, ids, upper) of the candidates whose upper bound reaches the final threshold."""
        if not self._parts:
            empty = np.empty(0, dtype=np.int64)
            return empty, empty, np.empty(0, dtype=np.float32)
        rows, ids, upper = (np.concatenate(p) for p in zip(*self._parts, strict=True))
        keep = upper >= self.threshold[rows]
        return rows[keep], ids[keep], upper[keep]


def select_top_k(
    rows: np.ndarray, ids: np.ndarray, scores: np.ndarray, batch: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(top_scores, top_ids), each `[batch, k]`: per row the k best (score descending, then id
    ascending), padded with -inf and id 0 where a row has fewer than k."""
    order = np.lexsort((ids, -scores, rows))
    rows, ids, scores = rows[order], ids[order], scores[order]
    rank = rank_within_rows(rows, batch)
    keep = rank < k
    top_scores = np.full((batch, k), -np.inf, dtype=np.float32)
    top_ids = np.zeros((batch, k), dtype=np.int64)
    top_scores[rows[keep], rank[keep]] = scores[keep]
    top_ids[rows[keep], rank[keep]] = ids[keep]
    return top_scores, top_ids
