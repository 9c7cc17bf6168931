"""The settings a user can set stay few and documented (issue 24: at most 40)."""

from __future__ import annotations

from compression.configs import DataSpec, DistillConfig, ModelConfig, TrainConfig

CLASSES = (ModelConfig, TrainConfig, DistillConfig, DataSpec)


def test_at_most_40_settings_each_with_a_one_line_doc() -> None:
    fields = {f"{c.__name__}.{n}": f for c in CLASSES for n, f in c.model_fields.items()}
    assert len(fields) <= 40, sorted(fields)
    undocumented = [n for n, f in fields.items() if not f.description]
    assert not undocumented, undocumented
    assert all("\n" not in f.description for f in fields.values())


def test_a_stored_recipe_with_retired_distillation_settings_still_reads() -> None:
    from compression.configs import StudentRecipe, without_retired

    old = {"strategy": "fixed", "alpha_step": 0.25, "min_teacher_weight": 0.0}
    stored = {"name": "s", "teacher": "t@1", "distill": old}
    current = without_retired(stored)
    assert current is not None and StudentRecipe(**current).distill == DistillConfig()
    # The plateau schedule at another floor than today's constant was another run.
    plateau = {**stored, "distill": {**stored["distill"], "strategy": "plateau"}}
    assert without_retired(plateau) is None
    same = {**stored, "distill": {"strategy": "plateau", "alpha_step": 0.25,
                                  "min_teacher_weight": 0.25}}  # fmt: skip
    assert without_retired(same) == {**stored, "distill": {"strategy": "plateau"}}
