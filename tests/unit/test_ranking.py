"""Mask + top-k in ONNX Runtime agrees with a plain numpy reference."""

from __future__ import annotations

import numpy as np

from app.ranking import Ranker


def reference(scores: np.ndarray, exclude: list[np.ndarray | None], k: int) -> list[list[int]]:
    out = []
    for row, ids in zip(scores, exclude, strict=True):
        masked = row.copy()
        masked[0] = -np.inf
        if ids is not None:
            masked[ids] = -np.inf
        order = np.argsort(-masked, kind="stable")[:k]
        out.append([int(i) for i in order if np.isfinite(masked[i])])
    return out


def test_top_k_matches_numpy_with_exclusions_and_never_picks_padding() -> None:
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((7, 300)).astype(np.float32)
    scores[:, 0] = 100.0  # the padding column scores best: it must still never come back
    exclude = [rng.choice(np.arange(1, 300), size=n, replace=False) for n in (0, 1, 5, 50, 299)]
    exclude += [None, np.array([], dtype=np.int64)]
    top_scores, top_ids = Ranker().top_k(scores, exclude, 10)
    assert top_ids.shape == top_scores.shape == (7, 10)
    expected = reference(scores, exclude, 10)
    for row in range(7):
        finite = np.isfinite(top_scores[row])
        assert top_ids[row][finite].tolist() == expected[row]
        assert np.allclose(top_scores[row][finite], scores[row, expected[row]])
        assert (np.diff(top_scores[row][finite]) <= 0).all()  # best first
    # Row 4 excluded all 299 real items: nothing finite is left to recommend.
    assert not np.isfinite(top_scores[4]).any()


def test_k_above_the_column_count_is_clipped() -> None:
    scores = np.arange(5, dtype=np.float32)[None, :]
    top_scores, top_ids = Ranker().top_k(scores, [np.array([2])], 50)
    assert top_ids.shape == (1, 5)
    assert top_ids[0, :3].tolist() == [4, 3, 1]
    assert not np.isfinite(top_scores[0, 3:]).any()
