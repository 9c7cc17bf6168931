"""Full-ranking evaluation: every item is ranked, the user's history is masked out.

Protocol (comparable with published SASRec numbers): leave-one-out, the target is ranked
against all items, items the user already interacted with (the whole history, not only the
model's window) cannot be recommended. Ties count against the target (pessimistic): rank =
number of other non-masked items whose score is >= the target's (`target_rank`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from compression.data.sequences import Split, pad_left

if TYPE_CHECKING:
    import torch

Scorer = Callable[[np.ndarray], np.ndarray]  # [batch, length] int64 -> [batch, n_items + 1]
KS = (10, 20)


def metrics_from_ranks(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """HR@k, NDCG@k (one relevant item: 1/log2(rank + 2)) and MRR from 0-based ranks."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks < k
        out[f"hr@{k}"] = float(hit.mean())
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean())
    out["mrr"] = float((1.0 / (ranks + 1.0)).mean())
    out["users"] = float(len(ranks))
    return out


def target_rank(
    scores: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None
) -> np.ndarray:
    """0-based rank of each row's target with pessimistic ties: the number of other items,
    not masked, whose score is >= the target's (a tie counts against the target).

    `scores` is `[rows, items]`, `target` `[rows]` column indices, `mask` an optional
    `[rows, items]` bool array, True where an item cannot be recommended (it never counts;
    the target itself never does either, masked or not). A NaN target score ranks last.
    `target_rank_torch` is the same rule on tensors.
    """
    scores = np.asarray(scores)
    target = np.asarray(target, dtype=np.int64)
    rows = np.arange(len(target))
    own = scores[rows, target][:, None]
    at_least = (scores >= own) | np.isnan(own)  # holds for the target itself: subtracted
    if mask is None:
        return at_least.sum(axis=1) - 1
    mask = np.asarray(mask, dtype=bool)
    return (at_least & ~mask).sum(axis=1) - (~mask[rows, target]).astype(np.int64)


def target_rank_torch(
    scores: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """`target_rank` on torch tensors (same pessimistic-tie rule, same arguments)."""
    import torch

    target = target.long()
    own = scores.gather(1, target[:, None])
    at_least = (scores >= own) | own.isnan()  # holds for the target itself: subtracted
    if mask is None:
        return at_least.sum(dim=1) - 1
    mask = mask.to(torch.bool)
    kept = ~mask.gather(1, target[:, None])[:, 0]
    return at_least.logical_and_(~mask).sum(dim=1) - kept.long()


def masked_ranks(
    scores: np.ndarray, targets: np.ndarray, histories: Sequence[np.ndarray]
) -> np.ndarray:
    """0-based rank of each target (`target_rank`: ties count against it) after masking
    padding (column 0) and history items."""
    scores = np.asarray(scores)
    mask = np.zeros(scores.shape, dtype=bool)
    rows = np.repeat(np.arange(len(histories)), [len(h) for h in histories])
    cols = np.concatenate(histories) if len(histories) else np.zeros(0, dtype=np.int64)
    mask[rows, cols] = True
    mask[:, 0] = True
    # A target the user had already seen still competes with its own score.
    return target_rank(scores, targets, mask)


def scored_batches(
    scorer: Callable[[np.ndarray], Any],
    histories: Sequence[np.ndarray],
    max_len: int,
    batch_size: int = 512,
) -> Iterator[tuple[np.ndarray, Any]]:
    """The one loop that scores histories (evaluation, parity, agreement): `(indices,
    scorer(batch))` per batch of `batch_size`, histories of similar length together so
    padding stays small, each left-padded to at most its last `max_len` items."""
    order = np.argsort([min(len(h), max_len) for h in histories], kind="stable")
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield idx, scorer(pad_left([histories[i] for i in idx], max_len))


def score_all(
    scorer: Scorer, histories: Sequence[np.ndarray], max_len: int, batch_size: int = 512
) -> np.ndarray:
    """Scores of every history, `[len(histories), n_items + 1]`, in input order."""
    out: np.ndarray | None = None
    for idx, scores in scored_batches(scorer, histories, max_len, batch_size):
        if out is None:
            out = np.empty((len(histories), scores.shape[1]), dtype=scores.dtype)
        out[idx] = scores
    if out is None:
        raise ValueError("no histories to score")
    return out


def top_k_agreement(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    """Mean |top-k(a) ∩ top-k(b)| / k over rows (column 0, padding, excluded)."""
    top_a = np.argpartition(-a[:, 1:], k, axis=1)[:, :k]
    top_b = np.argpartition(-b[:, 1:], k, axis=1)[:, :k]
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(top_a, top_b, strict=True)]))


def agreement(
    a: Scorer, b: Scorer, histories: Sequence[np.ndarray], max_len: int, batch_size: int = 256
) -> tuple[float, float]:
    """(max |a - b|, mean top-10 agreement) of two scorers on the same histories."""
    worst, agree = 0.0, 0.0
    pair = scored_batches(lambda x: (a(x), b(x)), histories, max_len, batch_size)
    for idx, (x, y) in pair:
        worst = max(worst, float(np.abs(x - y).max()))
        agree += top_k_agreement(x, y) * len(idx)
    return worst, agree / max(len(histories), 1)


def rank_targets(
    scorer: Scorer,
    histories: Sequence[np.ndarray],
    targets: np.ndarray,
    max_len: int,
    batch_size: int = 512,
) -> np.ndarray:
    """0-based rank of every user's target (`masked_ranks`)."""
    ranks = np.empty(len(histories), dtype=np.int64)
    for idx, scores in scored_batches(scorer, histories, max_len, batch_size):
        ranks[idx] = masked_ranks(scores, targets[idx], [histories[i] for i in idx])
    return ranks


def evaluate_scorer(
    scorer: Scorer, split: Split, stage: str, max_len: int, batch_size: int = 512
) -> dict[str, float]:
    histories, targets = split.eval_inputs(stage)
    return metrics_from_ranks(rank_targets(scorer, histories, targets, max_len, batch_size))


def popularity_scorer(split: Split) -> Scorer:
    """Scores every item by its training count: the baseline in every report."""
    counts = split.item_counts().astype(np.float32)

    def score(batch: np.ndarray) -> np.ndarray:
        return np.broadcast_to(counts, (batch.shape[0], counts.shape[0]))

    return score


def evaluate_popularity(split: Split, stage: str) -> dict[str, float]:
    return evaluate_scorer(popularity_scorer(split), split, stage, max_len=1)


def torch_scorer(model: object) -> Scorer:
    """Wrap a PyTorch model (eval mode, no gradients) as a numpy scorer."""
    import torch

    device = next(model.parameters()).device  # type: ignore[attr-defined]

    def score(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(batch).to(device)).float().cpu().numpy()  # type: ignore[operator]

    return score


def eval_batch_size(n_items: int, cells: int = 2**25) -> int:
    """Users per scoring batch: up to 512, fewer for large catalogues, so a batch's score
    matrix (and the rank masks built beside it) stays near `cells` floats (128 MB)."""
    return max(1, min(512, cells // (n_items + 1)))


def evaluate_model(
    model: object, split: Split, stage: str, batch_size: int | None = None
) -> dict[str, float]:
    """Full-ranking metrics of a PyTorch model, in batches sized for its catalogue."""
    batch_size = batch_size or eval_batch_size(split.n_items)
    was_training = model.training  # type: ignore[attr-defined]
    model.eval()  # type: ignore[attr-defined]
    try:
        max_len = model.cfg.max_len  # type: ignore[attr-defined]
        return evaluate_scorer(torch_scorer(model), split, stage, max_len, batch_size)
    finally:
        model.train(was_training)  # type: ignore[attr-defined]
