"""Mixed-dimension item embeddings (Ginart et al., "Mixed Dimension Embeddings with
Application to Memory-Efficient Recommendation Systems", ISIT 2021).

Items are ranked by training popularity and cut into buckets; bucket b stores
`dims[b]`-wide vectors and one projection to the common width. Popular items, which are
most of the targets, keep a wide vector; the long tail shares a narrow one. On ML-1M the
teacher's item matrix approximated this way at equal parameter count keeps 59% of its
NDCG@10 without retraining, against 42% for one uniform low rank (README).

`weight` materializes the full `[n_items + 1, out_dim]` matrix (row 0 = padding, zero), so
lookup and scoring are the same as for a plain table. The exported ONNX file keeps the
small factors; ONNX Runtime folds them into one matrix when a session starts (all inputs
are constants), so serving pays nothing per request for the factorization. Trained on
ML-1M at equal budget it did not beat one uniform 16-wide table (README, "How big must an
ML-1M student be?"); it learned faster early on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def popularity_order(counts: np.ndarray) -> np.ndarray:
    """Item ids (1..n), most trained-on first; ties keep id order (`counts[0]` is padding)."""
    return np.argsort(-np.asarray(counts)[1:], kind="stable") + 1


class MixedDimEmbedding(nn.Module):
    def __init__(
        self, n_items: int, cutoffs: Sequence[int], dims: Sequence[int], out_dim: int
    ) -> None:
        super().__init__()
        bounds = [0, *cutoffs, n_items]
        self.tables = nn.ParameterList(
            nn.Parameter(torch.randn(hi - lo, d) * 0.02)
            for lo, hi, d in zip(bounds[:-1], bounds[1:], dims, strict=True)
        )
        # Variance-preserving: a bucket's vectors reach out_dim with the table's scale.
        self.projs = nn.ParameterList(nn.Parameter(torch.randn(d, out_dim) * d**-0.5) for d in dims)
        # Row of each item id in the popularity-ordered matrix; identity until
        # `set_popularity`. A buffer, so a checkpoint carries the assignment.
        self.register_buffer("rows", torch.arange(n_items + 1))
        self.out_dim = out_dim

    def set_popularity(self, counts: np.ndarray) -> None:
        """Assign buckets by training counts (`counts[i]` for item id i; index 0 ignored)."""
        counts = np.asarray(counts)
        if counts.shape != (self.rows.numel(),):
            raise ValueError(
                f"counts has shape {counts.shape}, expected ({self.rows.numel()},): one per "
                "item id, padding included"
            )
        order = popularity_order(counts)
        rows = np.zeros_like(order, shape=self.rows.shape)
        rows[order] = np.arange(1, len(order) + 1)
        self.rows.copy_(torch.from_numpy(rows))

    @property
    def weight(self) -> Tensor:
        """`[n_items + 1, out_dim]`: row i is item i's vector (row 0, padding, is zero)."""
        parts = [t @ p for t, p in zip(self.tables, self.projs, strict=True)]
        pad = parts[0].new_zeros(1, self.out_dim)
        return torch.cat([pad, *parts])[self.rows]

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight)
