"""Distillation terms for large catalogues: the student's normaliser estimated from samples.

`cached_terms` takes a log-softmax of the student over the whole catalogue at every position:
at a million items that is the full-softmax cost again. Here the student scores only the
teacher's K items, the label, and `N` negatives drawn uniformly per batch; the sum of
exp(s / T) over the other items is estimated as (items / N) times the sum over the negatives
that are neither among the K nor the label (masked). Everything else is `cached_terms`: the
K + 1 categories ("rest" included), L2 on the K logits, cross-entropy against the label.
With every item drawn exactly once (N = items, a permutation, as the test does) the estimate
is exact and so are the terms; training draws with replacement, an unbiased estimate.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from compression.distill.terms import with_rest


def sampled_cached_terms(
    s_top: Tensor,
    s_label: Tensor,
    s_neg: Tensor,
    top_ids: Tensor,
    labels: Tensor,
    negatives: Tensor,
    n_items: int,
    top_logits: Tensor,
    lse: Tensor,
    temperature: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(KL * T^2, L2, CE) per position. Ids are 0-based item columns (`top_ids [rows, K]`,
    `labels [rows]`, `negatives [N]`); `s_*` the student's logits of them."""
    label_in_top = (top_ids == labels[:, None]).any(dim=1)
    masked = (negatives[None, :] == top_ids[:, :, None]).any(dim=1)
    masked |= negatives[None, :] == labels[:, None]
    scale = math.log(n_items / negatives.shape[0])

    def log_normaliser(t: float) -> Tensor:
        parts = [
            s_top / t,
            torch.where(label_in_top, float("-inf"), s_label / t)[:, None],
            (s_neg / t + scale).masked_fill(masked, float("-inf")),
        ]
        return torch.logsumexp(torch.cat(parts, dim=1), dim=1)

    log_z1 = log_normaliser(1.0)
    ce = log_z1 - s_label
    log_zt = log_z1 if temperature == 1.0 else log_normaliser(temperature)
    log_ps = with_rest(s_top / temperature - log_zt[:, None])
    log_pt = with_rest(top_logits / temperature - lse[:, None])
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1) * temperature**2
    l2 = (s_top - top_logits).pow(2).mean(dim=1)
    return kl, l2, ce


def student_logits_at(
    query: Tensor,
    weight: Tensor,
    ids: Tensor,
    entries: tuple[Tensor, Tensor] | None,
) -> Tensor:
    """The student's logits of item columns `ids` (`[rows, n]` or `[n]`, 0-based), read from
    its item matrix `weight` (padding row included) with sparse gradients."""
    from compression.model.losses import successor_scores_at

    vectors = F.embedding(ids + 1, weight, sparse=True)
    if ids.dim() == 1:
        logits = (query @ vectors.T).float()
    else:
        logits = torch.einsum("rd,rnd->rn", query, vectors).float()
    if entries is not None:
        logits = logits + successor_scores_at(entries, ids + 1)
    return logits
