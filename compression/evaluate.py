"""Full-ranking evaluation: every item is ranked, the user's history is masked out.

Protocol (comparable with published SASRec numbers): leave-one-out, the target is ranked
against all items, items the user already interacted with (the whole history, not only the
model's window) cannot be recommended, rank = number of items scored strictly higher.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from compression.data import Split, pad_left

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


def masked_ranks(
    scores: np.ndarray, targets: np.ndarray, histories: Sequence[np.ndarray]
) -> np.ndarray:
    """0-based rank of each target after masking padding (column 0) and history items."""
    scores = np.array(scores, dtype=np.float32, copy=True)
    rows = np.repeat(np.arange(len(histories)), [len(h) for h in histories])
    cols = np.concatenate(histories) if len(histories) else np.zeros(0, dtype=np.int64)
    target_scores = scores[np.arange(len(targets)), targets].copy()
    scores[rows, cols] = -np.inf
    scores[:, 0] = -np.inf
    # A target the user had already seen still competes with its own score.
    return (scores > target_scores[:, None]).sum(axis=1)


def rank_targets(
    scorer: Scorer,
    histories: Sequence[np.ndarray],
    targets: np.ndarray,
    max_len: int,
    batch_size: int = 512,
) -> np.ndarray:
    """Ranks for all users; users are batched by history length so padding stays small."""
    order = np.argsort([min(len(h), max_len) for h in histories], kind="stable")
    ranks = np.empty(len(histories), dtype=np.int64)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch_hist = [histories[i] for i in idx]
        scores = scorer(pad_left(batch_hist, max_len))
        ranks[idx] = masked_ranks(scores, targets[idx], batch_hist)
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


def evaluate_model(
    model: object, split: Split, stage: str, batch_size: int = 512
) -> dict[str, float]:
    was_training = model.training  # type: ignore[attr-defined]
    model.eval()  # type: ignore[attr-defined]
    try:
        max_len = model.cfg.max_len  # type: ignore[attr-defined]
        return evaluate_scorer(torch_scorer(model), split, stage, max_len, batch_size)
    finally:
        model.train(was_training)  # type: ignore[attr-defined]
