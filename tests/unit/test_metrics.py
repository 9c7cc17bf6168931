"""Full-ranking metrics against hand-computed ranks and an independent re-implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from compression.data import Split
from compression.evaluate import (
    evaluate_popularity,
    masked_ranks,
    metrics_from_ranks,
    rank_targets,
)


def test_metrics_from_hand_computed_ranks() -> None:
    m = metrics_from_ranks(np.array([0, 3, 9, 10, 25]))
    assert m["hr@10"] == pytest.approx(3 / 5)
    assert m["hr@20"] == pytest.approx(4 / 5)
    expected_ndcg10 = (1 / math.log2(2) + 1 / math.log2(5) + 1 / math.log2(11)) / 5
    assert m["ndcg@10"] == pytest.approx(expected_ndcg10)
    assert m["ndcg@20"] == pytest.approx(expected_ndcg10 + 1 / math.log2(12) / 5)
    assert m["mrr"] == pytest.approx((1 + 1 / 4 + 1 / 10 + 1 / 11 + 1 / 26) / 5)


def test_masked_ranks_hand_case() -> None:
    # 6 columns: 0 = padding, items 1..5.
    scores = np.array(
        [
            [9.0, 0.1, 0.5, 0.9, 0.3, 0.7],  # target 4 (0.3); 3 is history -> beaten by 5, 2
            [9.0, 0.9, 0.8, 0.7, 0.6, 0.5],  # target 1 is best -> rank 0
            [9.0, 0.9, 0.8, 0.7, 0.6, 0.5],  # target 5, history {1, 2} -> beaten by 3, 4
        ]
    )
    histories = [np.array([3]), np.array([2, 3]), np.array([1, 2])]
    ranks = masked_ranks(scores, np.array([4, 1, 5]), histories)
    assert ranks.tolist() == [2, 0, 2]


def naive_metrics(scores, targets, histories, k):  # independent, loop-based reference
    hr = ndcg = 0.0
    for row, target, hist in zip(scores, targets, histories, strict=True):
        candidates = [i for i in range(1, len(row)) if i not in set(hist.tolist()) or i == target]
        ordered = sorted(candidates, key=lambda i: (-row[i], i != target))
        rank = ordered.index(target)
        if rank < k:
            hr += 1
            ndcg += 1 / math.log2(rank + 2)
    return hr / len(targets), ndcg / len(targets)


def test_vectorized_metrics_match_naive_reimplementation() -> None:
    rng = np.random.default_rng(0)
    n_users, n_items, max_len = 300, 60, 20
    histories = [
        rng.choice(np.arange(1, n_items + 1), size=rng.integers(1, 30), replace=False)
        for _ in range(n_users)
    ]
    targets = rng.integers(1, n_items + 1, size=n_users)

    def scores_of(window_sum: np.ndarray) -> np.ndarray:
        # any deterministic function of the model's input window will do
        return np.sin(np.outer(window_sum + 1.0, np.arange(n_items + 1)) * 0.37)

    def scorer(batch: np.ndarray) -> np.ndarray:
        return scores_of(batch.sum(axis=1).astype(np.float64))

    ranks = rank_targets(scorer, histories, targets, max_len=max_len, batch_size=37)
    got = metrics_from_ranks(ranks)
    table = scores_of(np.array([h[-max_len:].sum() for h in histories], dtype=np.float64))
    for k in (10, 20):
        hr, ndcg = naive_metrics(table, targets, histories, k)
        assert got[f"hr@{k}"] == pytest.approx(hr)
        assert got[f"ndcg@{k}"] == pytest.approx(ndcg)


def test_popularity_baseline_ranks_by_training_counts() -> None:
    train = [np.array([1, 1, 2]), np.array([1, 3]), np.array([2, 4])]
    split = Split(train, np.array([2, 4, 1]), np.array([3, 3, 3]), n_items=5)
    # counts: item1=3, item2=2, item3=1, item4=1, item5=0
    m = evaluate_popularity(split, "valid")
    # user0 target 2, history {1,2}: item 1 masked -> rank 0; user1 target 4 history {1,3}:
    # item 2 (2) beats it -> rank 1; user2 target 1, history {2,4}: rank 0.
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1) / 3)
