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
