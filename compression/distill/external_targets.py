"""An external teacher's targets for every training position, computed once and cached on
disk (memory-mapped), so every student distilled from it reuses them.

Position j of a training pair is scored by the teacher reading the pair's input up to and
including j (its last `context` items, left-padded), exactly what the student predicts from
there. The cache key covers the teacher file, the join of its ids, the training pairs,
`width`, `top_k`, the temperature and `context`: change any and the targets are computed
again. Arrays are written with `np.save` and read with `allow_pickle=False`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from compression.data.sequences import pad_left
from compression.distill.external import ExternalTeacher
from compression.distill.loss import TeacherTargets
from compression.distill.targets_cache import cached_targets, targets_key
from compression.evaluate.metrics import target_rank


def external_targets(
    teacher: ExternalTeacher,
    inputs: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    width: int,
    top_k: int,
    temperature: float,
    *,
    context: int = 200,
    cache_dir: Path,
    batch_size: int = 256,
) -> TeacherTargets:
    """`TeacherTargets` for the last `width` positions of each pair (`DistillLoss` layout)."""
    known = int((teacher.join.columns > 0).sum())
    if top_k >= known:
        raise ValueError(
            f"[distill] top_k={top_k} but the teacher knows only {known} of the data's items: "
            f"set top_k below {known}"
        )
    settings: dict[str, int | float] = {
        "width": width, "top_k": top_k, "T": temperature, "context": context,
    }  # fmt: skip
    who = teacher.sha256.encode() + teacher.join.columns.tobytes()
    folder = cache_dir / targets_key(who, inputs, targets, settings)
    return cached_targets(
        folder, temperature, lambda: _compute(teacher, inputs, targets, settings, batch_size)
    )


def _compute(
    teacher: ExternalTeacher,
    inputs: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    settings: dict[str, int | float],
    batch_size: int,
) -> TeacherTargets:
    width, top_k, context = int(settings["width"]), int(settings["top_k"]), int(settings["context"])
    temperature = float(settings["T"])
    seen = np.array([min(len(t), width) for t in targets])
    offsets = np.concatenate([[0], np.cumsum(seen)]).astype(np.int64)
    # Every position's prefix and label, in the flattened order of `offsets`.
    prefixes, labels = [], []
    for x, y, n in zip(inputs, targets, seen, strict=True):
        for j in range(len(y) - n, len(y)):
            prefixes.append(x[: j + 1][-context:])
            labels.append(y[j])
    n = len(prefixes)
    id_dtype = np.int16 if teacher.join.columns.shape[0] < 2**15 else np.int32
    out = {
        "top_ids": np.empty((n, top_k), id_dtype),
        "top_logits": np.empty((n, top_k), np.float16),
        "lse": np.empty(n, np.float32),
        "rank": np.empty(n, np.int32),
    }
    order = np.argsort([len(p) for p in prefixes], kind="stable")  # similar lengths together
    for start in range(0, n, batch_size):
        rows = order[start : start + batch_size]
        scores = teacher.scores(pad_left([prefixes[r] for r in rows], context))[:, 1:]
        label = np.array([labels[r] for r in rows]) - 1
        top = np.argpartition(-scores, top_k - 1, axis=1)[:, :top_k]
        top_scores = np.take_along_axis(scores, top, axis=1)
        order_k = np.argsort(-top_scores, axis=1, kind="stable")
        out["top_ids"][rows] = np.take_along_axis(top, order_k, axis=1)
        out["top_logits"][rows] = np.take_along_axis(top_scores, order_k, axis=1)
        known = np.where(np.isfinite(scores), scores / temperature, -np.inf)
        peak = known.max(axis=1, keepdims=True)
        out["lse"][rows] = peak[:, 0] + np.log(np.exp(known - peak).sum(axis=1))
        out["rank"][rows] = target_rank(scores, label)  # unknown to the teacher: last
    return TeacherTargets(
        offsets, *(torch.from_numpy(out[k]) for k in ("top_ids", "top_logits", "lse", "rank")),
        temperature,
    )  # fmt: skip
