"""Scoring and evaluating ONNX variants: output comparison against fp32, ORT scorers for
`compression.evaluate.metrics`, and the NDCG@10 evaluator the adaptive quantizer calls."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compression.data.sequences import Split
from compression.evaluate.metrics import Scorer, agreement, evaluate_scorer
from compression.export.exporter import INPUT_NAME, OUTPUT_NAME
from compression.export.files import (
    QuantizeError,
    ScorerEval,
    load_scoring_model,
)
from model_store.runtime import ort_session


@dataclass(frozen=True)
class OutputComparison:
    sequences: int
    max_abs_diff: float
    top10_agreement: float


def compare_outputs(
    fp32_path: str | Path,
    other_path: str | Path,
    histories: Sequence[np.ndarray],
    max_len: int,
    batch_size: int = 256,
    threads: int | None = None,
) -> OutputComparison:
    """Score the same histories with both files: max |diff| and mean top-10 overlap."""
    for path in (fp32_path, other_path):
        load_scoring_model(path)
    if not len(histories):
        raise QuantizeError(f"{other_path}: no histories to compare on")
    a, b = onnx_scorer(fp32_path, threads), onnx_scorer(other_path, threads)
    worst, agree = agreement(a, b, histories, max_len, batch_size)
    return OutputComparison(len(histories), worst, agree)


def onnx_scorer(path: str | Path, threads: int | None = None) -> Scorer:
    """An ORT session on `path` as a `compression.evaluate.metrics` scorer."""
    session = ort_session(Path(path), threads)

    def score(batch: np.ndarray) -> np.ndarray:
        return session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]

    return score


def subsample_users(split: Split, users: int, stage: str = "valid", seed: int = 0) -> Split:
    """The same split restricted to `users` users that are evaluated at `stage`."""
    targets = split.valid_target if stage == "valid" else split.test_target
    eligible = np.flatnonzero(targets > 0)
    if users >= len(eligible):
        return split
    chosen = np.sort(np.random.default_rng(seed).choice(eligible, size=users, replace=False))
    return Split(
        train=[split.train[u] for u in chosen],
        valid_target=split.valid_target[chosen],
        test_target=split.test_target[chosen],
        n_items=split.n_items,
    )


def ndcg_evaluator(
    split: Split,
    max_len: int,
    stage: str = "valid",
    users: int | None = None,
    seed: int = 0,
    threads: int | None = None,
) -> ScorerEval:
    """`path -> NDCG@10` with full ranking (`evaluate_scorer`), optionally on a seeded user
    subsample: the adaptive search evaluates up to N + 2 models, and a few thousand users
    rank variants as well as all of them."""
    sub = subsample_users(split, users, stage, seed) if users is not None else split

    def evaluate(path: Path) -> float:
        return evaluate_scorer(onnx_scorer(path, threads), sub, stage, max_len)["ndcg@10"]

    return evaluate
