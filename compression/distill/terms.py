"""The per-position distillation terms (KL * T^2 over the teacher's top K plus a "rest"
category, L2 between logits, cross-entropy against the label), from live teacher logits
(`distill_terms`) or from cached teacher targets (`cached_terms`). The formula and why it
has each part: `compression.distill.loss`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from compression.evaluate.metrics import target_rank_torch


def distill_terms(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    temperature: float,
    top_k: int | None = None,
    with_rank: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Per-position (KL * T^2, L2, CE, teacher rank of the label); logits are `[n, items]`.

    The rank costs one more pass over the catalogue; `with_rank=False` skips it (None).
    """
    s = student_logits.float()
    t = teacher_logits.float()
    ce = F.cross_entropy(s, labels, reduction="none")
    rank = target_rank_torch(t, labels) if with_rank else None
    log_ps = F.log_softmax(s / temperature, dim=1)
    log_pt = F.log_softmax(t / temperature, dim=1)
    if top_k is not None and top_k < t.shape[1]:
        # K + 1 categories: the teacher's K best items and "everything else" as one bucket.
        # Without the bucket nothing keeps the other items low, and ML-1M students fell
        # below popularity.
        top = t.topk(top_k, dim=1).indices
        s, t = s.gather(1, top), t.gather(1, top)
        log_ps, log_pt = with_rest(log_ps.gather(1, top)), with_rest(log_pt.gather(1, top))
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1) * temperature**2
    l2 = (s - t).pow(2).mean(dim=1)
    return kl, l2, ce, rank


def with_rest(log_p_top: Tensor) -> Tensor:
    """Append log(1 - sum p) of the items outside the top K as one more column."""
    covered = torch.logsumexp(log_p_top, dim=1, keepdim=True).clamp(max=-1e-6)
    return torch.cat([log_p_top, torch.log(-torch.expm1(covered))], dim=1)


def cached_terms(
    student_logits: Tensor,
    top_ids: Tensor,
    top_logits: Tensor,
    lse: Tensor,
    labels: Tensor,
    temperature: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """`distill_terms` with `top_k` from cached teacher targets: (KL * T^2, L2, CE).

    `lse` is logsumexp(z_t / T) over the whole catalogue, so `top_logits / T - lse` are the
    teacher's log-probabilities of its K best items exactly as `distill_terms` computes them.
    """
    s = student_logits.float()
    log_p1 = F.log_softmax(s, dim=1)  # over the catalogue: the costly step, once at T = 1
    ce = F.nll_loss(log_p1, labels, reduction="none")
    log_ps_full = log_p1 if temperature == 1.0 else F.log_softmax(s / temperature, dim=1)
    log_ps = with_rest(log_ps_full.gather(1, top_ids))
    log_pt = with_rest(top_logits / temperature - lse[:, None])
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1) * temperature**2
    l2 = (s.gather(1, top_ids) - top_logits).pow(2).mean(dim=1)
    return kl, l2, ce
