"""A stored teacher's targets are computed once, cached on disk, equal to a fresh pass, and
computed again when the teacher, the pairs or a setting changes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from compression.configs import ModelConfig
from compression.distill import targets_cache
from compression.distill.loss import TeacherTargets, teacher_targets
from compression.distill.targets_cache import stored_teacher_targets
from compression.model.sasrec import SASRec

torch.manual_seed(0)
TEACHER = SASRec(ModelConfig(n_items=30, max_len=8, hidden=8)).eval()
RNG = np.random.default_rng(0)
INPUTS = [RNG.integers(1, 31, size=n) for n in (3, 8, 5, 1)]
TARGETS = [np.append(x[1:], RNG.integers(1, 31)) for x in INPUTS]


def same(a: TeacherTargets, b: TeacherTargets) -> None:
    assert np.array_equal(a.offsets, b.offsets) and a.temperature == b.temperature
    for name in ("top_ids", "top_logits", "lse", "rank"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_cached_targets_equal_a_fresh_pass_and_are_not_computed_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fresh = teacher_targets(TEACHER, INPUTS, TARGETS, 6, 5, 2.0)
    of = stored_teacher_targets(TEACHER, "sha-a", tmp_path)
    same(of(INPUTS, TARGETS, 6, 5, 2.0), fresh)
    assert len(list(tmp_path.iterdir())) == 1

    def never(*_: object, **__: object) -> TeacherTargets:
        raise AssertionError("computed again")

    monkeypatch.setattr(targets_cache, "teacher_targets", never)
    same(stored_teacher_targets(TEACHER, "sha-a", tmp_path)(INPUTS, TARGETS, 6, 5, 2.0), fresh)


@pytest.mark.parametrize(
    "change",
    [
        {"sha": "sha-b"},
        {"temperature": 1.0},
        {"top_k": 4},
        {"width": 5},
        {"inputs": [x[::-1] for x in INPUTS]},
    ],
    ids=lambda c: next(iter(c)),
)
def test_a_change_computes_new_targets(change: dict[str, object], tmp_path: Path) -> None:
    stored_teacher_targets(TEACHER, "sha-a", tmp_path)(INPUTS, TARGETS, 6, 5, 2.0)
    args = {"inputs": INPUTS, "width": 6, "top_k": 5, "temperature": 2.0, **change}
    of = stored_teacher_targets(TEACHER, str(change.get("sha", "sha-a")), tmp_path)
    got = of(args["inputs"], TARGETS, args["width"], args["top_k"], args["temperature"])
    assert len(list(tmp_path.iterdir())) == 2
    fresh = teacher_targets(
        TEACHER, args["inputs"], TARGETS, args["width"], args["top_k"], args["temperature"]
    )
    same(got, fresh)
