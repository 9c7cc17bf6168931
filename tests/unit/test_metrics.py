"""Full-ranking metrics against hand-computed ranks and an independent re-implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from compression.data.sequences import Split
from compression.evaluate.metrics import (
    agreement,
    eval_batch_size,
    evaluate_popularity,
    masked_ranks,
    metrics_from_ranks,
    rank_targets,
    score_all,
    target_rank,
    target_rank_torch,
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
        # pessimistic ties: the target goes after every item with the same score
        ordered = sorted(candidates, key=lambda i: (-row[i], i == target))
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


def test_ties_count_against_the_target() -> None:
    # the target (item 2) ties with items 1, 4 and 5; item 3 is strictly higher
    scores = np.array([[0.0, 0.5, 0.5, 0.9, 0.5, 0.5, 0.1]])
    assert target_rank(scores, np.array([2])).tolist() == [4]
    # column 0 is padding; masked items never count, even when they tie
    mask = np.zeros_like(scores, dtype=bool)
    mask[0, [0, 3]] = True
    assert target_rank(scores, np.array([2]), mask).tolist() == [3]
    # through the evaluation path: item 3 is history -> rank 3 (the 3 ties), not 0
    assert masked_ranks(scores, np.array([2]), [np.array([3])]).tolist() == [3]
    # a target the user had already seen is ranked with its own score, ties against it
    assert masked_ranks(scores, np.array([2]), [np.array([2, 3])]).tolist() == [3]


def test_nan_target_score_ranks_last() -> None:
    scores = np.array([[0.0, np.nan, 0.2, 0.3]])
    assert target_rank(scores, np.array([1])).tolist() == [3]
    assert masked_ranks(scores, np.array([1]), [np.array([3])]).tolist() == [1]


def test_popularity_baseline_with_all_equal_counts_is_not_flattered() -> None:
    # every item is bought exactly twice: the popularity scores are all equal, so the
    # target ties with every candidate and ranks last; strict ">" would put it first.
    n_items = 50
    rng = np.random.default_rng(0)
    train = [np.array([u, u % n_items + 1]) for u in range(1, n_items + 1)]
    assert np.all(np.bincount(np.concatenate(train), minlength=n_items + 1)[1:] == 2)
    targets = np.array([rng.choice(np.setdiff1d(np.arange(1, n_items + 1), h)) for h in train])
    split = Split(train, targets, targets, n_items=n_items)
    m = evaluate_popularity(split, "valid")
    assert m["hr@10"] <= 10 / n_items  # a random tie-break would average 10 / n_items
    assert m["hr@10"] == 0.0
    assert m["mrr"] == pytest.approx(1 / (n_items - 2))  # 2 history items masked


def test_torch_and_numpy_ranks_agree_with_forced_ties() -> None:
    torch = pytest.importorskip("torch")
    from compression.distill.terms import distill_terms

    rng = np.random.default_rng(1)
    rows, items = 64, 40
    scores = rng.integers(0, 4, size=(rows, items)).astype(np.float32)  # many ties
    scores[3, 7] = np.nan
    target = rng.integers(0, items, size=rows)
    target[3] = 7
    mask = rng.random((rows, items)) < 0.2
    naive = []
    for r in range(rows):
        t = scores[r, target[r]]
        others = [i for i in range(items) if i != target[r] and not mask[r, i]]
        naive.append(sum(1 for i in others if np.isnan(t) or scores[r, i] >= t))
    got = target_rank(scores, target, mask)
    assert got.tolist() == naive
    t_scores, t_target = torch.from_numpy(scores), torch.from_numpy(target)
    assert target_rank_torch(t_scores, t_target, torch.from_numpy(mask)).tolist() == naive
    assert target_rank_torch(t_scores, t_target).tolist() == target_rank(scores, target).tolist()
    # distillation's teacher rank follows the same rule
    finite = torch.from_numpy(np.nan_to_num(scores))
    *_, rank = distill_terms(finite, finite, t_target, temperature=1.0)
    assert rank.tolist() == target_rank(np.nan_to_num(scores), target).tolist()


def test_the_scoring_loop_batches_by_length_and_returns_input_order() -> None:
    rng = np.random.default_rng(0)
    histories = [rng.integers(1, 30, size=n) for n in rng.integers(1, 30, size=50)]
    widths: list[int] = []

    def last_item(batch: np.ndarray) -> np.ndarray:  # one-hot of each row's newest item
        widths.append(batch.shape[1])
        return np.eye(30, dtype=np.float32)[batch[:, -1]]

    scores = score_all(last_item, histories, max_len=20, batch_size=8)
    assert scores.argmax(axis=1).tolist() == [int(h[-1]) for h in histories]
    assert widths == sorted(widths) and max(widths) == 20  # similar lengths share a batch
    assert agreement(last_item, last_item, histories, max_len=20) == (0.0, 1.0)


def test_evaluation_batches_shrink_with_the_catalogue() -> None:
    assert eval_batch_size(3_416) == 512  # ML-1M: as before
    assert eval_batch_size(1_000_000) == 33  # ~128 MB of scores per batch
    assert eval_batch_size(10**9) == 1
