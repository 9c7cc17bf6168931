"""ONNX-derived variants: re-export of a stored model; an INT8 variant evaluated and
published with its parent; nothing published when the transform fails."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from compression.configs import TeacherRecipe, TrainConfig
from compression.pipeline import train_teacher
from compression.quantize.int8 import QuantizeConfig, quantize_dynamic_int8
from compression.variants import (
    export_stored,
    fp16_variant,
    prune_variant,
    publish_onnx_variant,
    quantize_variant,
)
from model_store.manifest import Manifest
from model_store.store import ModelStore

DATA = "synthetic:users=300,items=60,max_len=16,min_len=6,seed=3"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    store = ModelStore(tmp_path_factory.mktemp("store"))
    recipe = TeacherRecipe(
        name="t", data={"path": DATA}, model={"hidden": 32, "max_len": 16, "n_heads": 2},
        train={"max_epochs": 5, "lr": 5e-3},
    )  # fmt: skip
    train_teacher(recipe, store, progress=False, log=lambda _: None)
    return store


def checkpoint_only(store: ModelStore, name: str) -> Manifest:
    """`t@1` republished as `name` the way models were before ONNX export and popularity."""
    m, folder = store.load("t@1")
    files = {name: folder / name for name in ("model.safetensors", "items.json")}
    return store.publish(
        name, files,
        kind="teacher", parent=None, architecture=m.architecture, recipe=m.recipe,
        dataset=m.dataset, metrics=m.metrics,
    )  # fmt: skip


def test_export_stored_adds_onnx_and_popularity_to_a_checkpoint_only_model(
    store: ModelStore,
) -> None:
    # A model from before ONNX export and popularity counts: drop both from version 1.
    legacy = checkpoint_only(store, "legacy")
    new = export_stored(store, f"{legacy.name}@{legacy.version}")
    assert new.version == 2 and new.parent == "legacy@1"
    assert {"model.safetensors", "model.onnx", "items.json"} == set(new.artifacts)
    assert new.artifacts["model.safetensors"].format == "pytorch"
    assert new.metrics["parity_top10_agreement"] == 1.0
    _, new_folder = store.load("legacy@2")
    counts = json.loads((new_folder / "items.json").read_text())["counts"]
    assert len(counts) == legacy.dataset.n_items and sum(counts) > 0


def test_int8_variant_is_evaluated_and_published_with_its_parent(store: ModelStore) -> None:
    parent, _ = store.load("t@1")
    cfg = QuantizeConfig(mode="dynamic")
    m = publish_onnx_variant(
        store, "t@1", "t-int8", lambda src, dst, split: quantize_dynamic_int8(src, dst, cfg),
        kind="quantized", precision="int8", recipe={"quantize": cfg.model_dump()},
        log=lambda _: None,
    )  # fmt: skip
    assert m.parent == "t@1" and m.kind == "quantized"
    assert m.artifacts["model.onnx"].precision == "int8"
    assert m.metrics["model_bytes"] < m.metrics["parent_model_bytes"]
    assert m.metrics["top10_agreement_vs_parent"] > 0.8
    assert m.metrics["ndcg_retention"] == pytest.approx(
        m.metrics["test_ndcg@10"] / parent.metrics["test_ndcg@10"]
    )
    assert m.recipe["data"]["path"] == DATA  # a variant stays evaluable on its own


def test_a_transform_that_fails_publishes_nothing(store: ModelStore) -> None:
    def broken(src: Path, dst: Path, split: object) -> None:
        shutil.copy(src, dst)
        raise RuntimeError("quantizer crashed")

    with pytest.raises(RuntimeError, match="quantizer crashed"):
        publish_onnx_variant(store, "t@1", "t-broken", broken, kind="quantized",
                             precision="int8", recipe={}, log=lambda _: None)  # fmt: skip
    assert "t-broken" not in store.names()


@pytest.mark.parametrize(
    "cfg, item_matrix",
    [
        ({"mode": "static", "calibration": "minmax", "calibration_sequences": 64}, False),
        ({"mode": "dynamic", "adaptive": True, "max_ndcg_loss": 0.0}, False),
        ({"mode": "dynamic"}, True),
    ],
)
def test_quantize_variant_records_how_it_was_made(
    store: ModelStore, cfg: dict, item_matrix: bool
) -> None:
    m = quantize_variant(store, "t@1", QuantizeConfig(**cfg), item_matrix=item_matrix,
                         adaptive_users=None, log=lambda _: None)  # fmt: skip
    assert m.parent == "t@1" and m.recipe["quantize"]["mode"] == cfg["mode"]
    assert m.recipe["item_matrix_int8"] is item_matrix
    assert m.metrics["top10_agreement_vs_parent"] > 0.7
    if cfg.get("adaptive"):
        adaptive = m.recipe["adaptive"]
        # A zero budget is met only by keeping float nodes (or by quantization not hurting).
        assert adaptive["relative_ndcg_loss"] <= 0.0 or adaptive["kept_float_nodes"]
    if item_matrix:
        before, after = m.recipe["item_matrix_bytes"]
        assert after < before  # tiny model: the item matrix is a small share of the file


def test_fp16_variant_keeps_int64_in_and_float32_out(store: ModelStore) -> None:
    import onnx

    m = fp16_variant(store, "t@1", log=lambda _: None)
    _, folder = store.load(f"{m.name}@{m.version}")
    graph = onnx.load(str(folder / "model.onnx")).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert m.artifacts["model.onnx"].precision == "fp16"
    assert m.metrics["top10_agreement_vs_parent"] > 0.9


def test_pruned_variant_is_smaller_fine_tuned_and_published(store: ModelStore) -> None:
    from compression.model.prune import PruneConfig

    cfg = PruneConfig(heads_keep=1, ffn_keep=0.5, fine_tune_epochs=1, sparsity=0.5)
    m = prune_variant(store, "t@1", cfg, train_cfg=TrainConfig(lr=5e-3), log=lambda _: None)
    assert m.parent == "t@1" and m.kind == "pruned" and "model.onnx" in m.artifacts
    assert m.architecture["n_heads"] == 1 and m.architecture["ffn"] == 16  # hidden 32, ffn = hidden
    assert m.metrics["params"] < m.metrics["parent_params"]
    assert m.metrics["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert m.metrics["epochs"] == 1 and m.recipe["removed"]


def test_models_of_a_re_exported_teacher_stay_in_its_family(store: ModelStore) -> None:
    from compression.report.compare import find_family

    m, folder = store.load("t@1")
    legacy = checkpoint_only(store, "old")
    student = store.publish(  # distilled from the checkpoint-only version
        "old-student", {"model.onnx": folder / "model.onnx", "items.json": folder / "items.json"},
        kind="student", parent=f"old@{legacy.version}", architecture=m.architecture,
        recipe=m.recipe, dataset=m.dataset, metrics=m.metrics,
    )  # fmt: skip
    exported = export_stored(store, f"old@{legacy.version}")
    teacher, members, _ = find_family(store, f"old@{exported.version}")
    assert teacher.version == exported.version
    assert [f"{x.name}@{x.version}" for x in members] == [f"old-student@{student.version}"]
