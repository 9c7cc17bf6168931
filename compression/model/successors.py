"""Successor lists: each item's most frequent next items, a sparse complement to the dense scores.

A first-order Markov chain alone (training transition counts from the last item, no
learning) scores 0.140 test NDCG@10 on ML-1M, 75% of the Transformer teacher
(`benchmarks/successor_prior.py`), and its ranking is high-rank: a small student's 16-wide
item vectors cannot hold it (README "How big must an ML-1M student be?"). This table keeps
its head: row i holds the ids of the `k` items that
most often follow item i in the training sequences (fixed once from the data, like a
vocabulary); the model learns one weight per (lag, slot), and the score of item j after a
history gains `sum over lag l, slot s with succ[h_{-1-l}, s] = j of weight[l, s]`.
Stored numbers: `(n_items + 1) * k` ids (counted as parameters by `SASRec.num_parameters`,
conservatively: an id holds log2(n_items) bits) plus `lags * k` weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def top_successors(sequences: Sequence[np.ndarray], n_items: int, k: int) -> np.ndarray:
    """`[n_items + 1, k]` int64: per item, the `k` items that most often directly follow it
    (ties: lower id first); 0 fills rows with fewer distinct successors, and row 0."""
    seqs = [np.asarray(s, dtype=np.int64) for s in sequences if len(s) > 1]
    out = np.zeros((n_items + 1, k), dtype=np.int64)
    if not seqs:
        return out
    src = np.concatenate([s[:-1] for s in seqs])
    dst = np.concatenate([s[1:] for s in seqs])
    keep = (src > 0) & (dst > 0)
    if (src > n_items).any() or (dst > n_items).any():
        raise ValueError(f"item ids above n_items={n_items} in the sequences")
    pairs, counts = np.unique(src[keep] * (n_items + 1) + dst[keep], return_counts=True)
    src, dst = pairs // (n_items + 1), pairs % (n_items + 1)
    order = np.lexsort((dst, -counts, src))  # by source, then most frequent, then lower id
    src, dst = src[order], dst[order]
    first = np.searchsorted(src, src, side="left")
    slot = np.arange(len(src)) - first
    kept = slot < k
    out[src[kept], slot[kept]] = dst[kept]
    return out


class SuccessorTable(nn.Module):
    """Sparse successor scores over the last `lags` items of a history (module docstring)."""

    def __init__(self, n_items: int, k: int, lags: int) -> None:
        super().__init__()
        self.lags = lags
        self.register_buffer("succ", torch.zeros(n_items + 1, k, dtype=torch.int64))
        # Zero: training starts from the dense model alone and learns how far to trust each
        # (lag, slot).
        self.weight = nn.Parameter(torch.zeros(lags, k))

    def fit(self, sequences: Sequence[np.ndarray]) -> None:
        n_items, k = self.succ.shape[0] - 1, self.succ.shape[1]
        self.succ.copy_(torch.from_numpy(top_successors(sequences, n_items, k)))

    @property
    def n_ids(self) -> int:
        return self.succ.numel()

    def _entries(self, recent: Tensor) -> tuple[Tensor, Tensor]:
        """`recent [..., lags]` (most recent first) -> successor ids and their weights, both
        `[..., lags * k]`; padding and empty slots carry weight 0."""
        ids = self.succ[recent]  # [..., lags, k]
        values = torch.where(ids > 0, self.weight, 0.0)
        flat = (*ids.shape[:-2], -1)
        return ids.reshape(flat), values.reshape(flat)

    def at_positions(self, seq: Tensor) -> tuple[Tensor, Tensor]:
        """For every position t of `seq [batch, length]`, the entries scored after reading
        items up to t: `[batch, length, lags * k]` ids and weights (items before the window
        count as padding)."""
        length = seq.shape[1]
        padded = F.pad(seq, (self.lags - 1, 0))
        recent = torch.stack(
            [
                padded[:, self.lags - 1 - lag : self.lags - 1 - lag + length]
                for lag in range(self.lags)
            ],
            dim=-1,
        )
        return self._entries(recent)

    def add_to(self, scores: Tensor, seq: Tensor) -> Tensor:
        """`scores [batch, n_items + 1]` after the whole of `seq`, plus the successor scores."""
        recent = F.pad(seq, (self.lags, 0))[:, -self.lags :].flip(1)
        ids, values = self._entries(recent)
        return scores.scatter_add(1, ids, values.to(scores.dtype))


def add_entries(logits: Tensor, entries: tuple[Tensor, Tensor] | None) -> Tensor:
    """`logits [rows, n_items]` over items 1..n (no padding column) plus successor entries
    `([rows, m] ids, [rows, m] weights)` from `SuccessorTable.at_positions`."""
    if entries is None:
        return logits
    ids, values = entries
    # Id 0 (no successor) always has weight 0: adding it to column 0 changes nothing.
    return logits.scatter_add(1, (ids - 1).clamp(min=0), values.to(logits.dtype))
