"""Variants made from a stored model's ONNX graph (INT8, FP16, item-matrix INT8), each
evaluated with the same full-ranking protocol and published with its parent recorded.

Every variant carries: test HR/NDCG@10/20 measured on the variant itself (ONNX Runtime),
its NDCG retention and top-10 agreement vs the parent, the parent's parameter count, and
the bytes of its model file.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compression.data.sequences import Split
from compression.evaluate.metrics import eval_batch_size, evaluate_scorer
from compression.export.compact import compact_file
from compression.export.exporter import check_parity, export_onnx
from compression.pipeline import PARITY_SEQUENCES, model_split, prefixed
from compression.quantize.int4 import DEFAULT_BLOCK_SIZE
from model_store.manifest import Manifest
from model_store.store import CHECKPOINT_FILE, ModelStore

Transform = Callable[[Path, Path, Split], Any]  # (fp32 onnx, variant onnx, data) -> details


def _with_counts(manifest: Manifest, folder: Path, split: Split, dst: Path) -> None:
    """The parent's item mapping, with popularity counts added when it predates them."""
    from compression.data.sequences import read_item_mapping, write_item_mapping

    ids = read_item_mapping(folder / manifest.item_mapping)
    write_item_mapping(dst, ids, split.item_counts()[1:])


def export_stored(store: ModelStore, ref: str) -> Manifest:
    """Publish a new version of a stored PyTorch model that also carries `model.onnx`
    (parity-checked) and popularity counts: for models trained before either existed.
    The service's PyTorch GPU engine reads the checkpoint itself (`CHECKPOINT_FILE`)."""
    from compression.model.train import load_checkpoint, stored_checkpoint

    manifest, folder = store.load(ref)
    checkpoint = stored_checkpoint(manifest, folder, "export")
    _, split = model_split(manifest)
    model = load_checkpoint(checkpoint).eval()
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path, items = Path(tmp) / "model.onnx", Path(tmp) / "items.json"
        export_onnx(model, onnx_path)
        histories = split.eval_inputs("test")[0][:PARITY_SEQUENCES]
        parity = check_parity(model, onnx_path, histories).as_metrics()
        _with_counts(manifest, folder, split, items)
        shutil.copy(checkpoint, Path(tmp) / CHECKPOINT_FILE)
        files = {
            CHECKPOINT_FILE: Path(tmp) / CHECKPOINT_FILE,
            "model.onnx": onnx_path,
            "items.json": items,
        }
        return store.publish(
            manifest.name,
            files,
            kind=manifest.kind,
            parent=f"{manifest.name}@{manifest.version}",
            architecture=manifest.architecture,
            recipe={**manifest.recipe, "exported_from": f"{manifest.name}@{manifest.version}"},
            dataset=manifest.dataset,
            metrics={**manifest.metrics, **parity},
            signature=manifest.signature,
        )


def _refuse_bidirectional(parent: Manifest, what: str) -> None:
    if parent.architecture.get("bidirectional"):
        raise ValueError(
            f"{parent.name}@{parent.version} is bidirectional (BERT-style): {what} is not "
            "supported for it; distil it into a causal student first"
        )


def publish_onnx_variant(
    store: ModelStore,
    parent_ref: str,
    name: str,
    transform: Transform,
    *,
    kind: str,
    precision: str,
    recipe: dict[str, Any],
    max_len: int | None = None,
    log: Callable[[str], None] = print,
) -> Manifest:
    """Apply `transform` to the parent's ONNX graph, evaluate the result, publish it.

    `max_len` below the parent's makes the variant read only the most recent `max_len` items
    (evaluated, published and served that way).

    `transform` may return a dict of details (e.g. the nodes adaptive quantization kept in
    float); they are recorded in the manifest's recipe.
    """
    from compression.evaluate.metrics import score_all, top_k_agreement
    from compression.evaluate.onnx_scoring import onnx_scorer

    parent, folder = store.load(parent_ref)
    if "model.onnx" not in parent.artifacts:
        raise ValueError(f"{parent_ref}: has no model.onnx; run `recsys export {parent_ref}`")
    _, split = model_split(parent)
    parent_len = int(parent.architecture["max_len"])
    max_len = min(max_len or parent_len, parent_len)
    with tempfile.TemporaryDirectory() as tmp:
        dst, items = Path(tmp) / "model.onnx", Path(tmp) / "items.json"
        details = transform(folder / "model.onnx", dst, split)
        compacted = compact_file(dst, max_len if max_len < parent_len else None)
        batch = eval_batch_size(split.n_items)
        test = evaluate_scorer(onnx_scorer(dst), split, "test", max_len, batch)
        tests = split.eval_inputs("test")[0][:PARITY_SEQUENCES]
        agreement = top_k_agreement(
            score_all(onnx_scorer(folder / "model.onnx"), tests, parent_len, batch),
            score_all(onnx_scorer(dst), tests, max_len, batch),
        )
        parent_ndcg = parent.metrics.get("test_ndcg@10")
        metrics = {
            **prefixed("test", test),
            "params": parent.metrics.get("params", 0.0),
            "model_bytes": float(dst.stat().st_size),
            "parent_model_bytes": float(parent.artifacts["model.onnx"].size_bytes),
            "top10_agreement_vs_parent": agreement,
        }
        if parent_ndcg:
            metrics["ndcg_retention_vs_parent"] = test["ndcg@10"] / parent_ndcg
        teacher_ndcg = parent.metrics.get("teacher_test_ndcg@10")
        if parent.kind == "teacher":
            teacher_ndcg = parent_ndcg
        if teacher_ndcg:
            metrics["teacher_test_ndcg@10"] = teacher_ndcg
            metrics["ndcg_retention"] = test["ndcg@10"] / teacher_ndcg
        log(f"{name}: test ndcg@10 {test['ndcg@10']:.4f} (parent {parent_ndcg}), "
            f"top-10 agreement {agreement:.4f}, {dst.stat().st_size:,} bytes")  # fmt: skip
        _with_counts(parent, folder, split, items)
        extra = {**(details if isinstance(details, dict) else {}), "compact": compacted}
        return store.publish(
            name,
            {"model.onnx": dst, "items.json": items},
            kind=kind,
            parent=f"{parent.name}@{parent.version}",
            architecture={**parent.architecture, "max_len": max_len},
            recipe={**recipe, "data": parent.recipe.get("data", {}), **extra},
            dataset=parent.dataset,
            metrics=metrics,
            signature=parent.signature,
            formats={"model.onnx": ("onnx", precision)},
        )


def quantize_variant(
    store: ModelStore,
    parent_ref: str,
    cfg: Any,
    *,
    item_matrix: bool = False,
    name: str | None = None,
    adaptive_users: int | None = 2000,
    log: Callable[[str], None] = print,
) -> Manifest:
    """INT8 variant of a stored model: `cfg` is a `QuantizeConfig` (dynamic or static, with
    or without adaptive node exclusion); `item_matrix` first stores the item matrix as int8
    with one scale per row. Calibration uses training histories, the adaptive budget is
    judged on validation users (a seeded sample of `adaptive_users`), and the published
    metrics on the test users: three disjoint roles."""
    from compression.evaluate.onnx_scoring import ndcg_evaluator
    from compression.quantize.adaptive import AdaptiveResult, quantize_int8
    from compression.quantize.item_matrix import quantize_item_matrix

    parent, _ = store.load(parent_ref)
    max_len = int(parent.architecture["max_len"])

    def transform(src: Path, dst: Path, split: Split) -> dict[str, Any]:
        details: dict[str, Any] = {"quantize": cfg.model_dump(), "item_matrix_int8": item_matrix}
        if item_matrix:
            rows = dst.with_name("rows.onnx")
            report = quantize_item_matrix(src, rows)
            details["item_matrix_bytes"] = [report.bytes_before, report.bytes_after]
            details["item_matrix_row_bits"] = report.row_bits
            src = rows
        result = quantize_int8(
            src,
            dst,
            cfg,
            max_len=max_len,
            calibration_histories=split.train,
            scorer_eval=(
                ndcg_evaluator(split, max_len, users=adaptive_users) if cfg.adaptive else None
            ),
            proxy_histories=split.eval_inputs("valid")[0][:256] if cfg.adaptive else None,
        )
        if isinstance(result, AdaptiveResult):
            details["adaptive"] = result.as_manifest()
        return details

    suffix = f"int8-{cfg.mode}"
    suffix += ("-adaptive" if cfg.adaptive else "") + ("-rows" if item_matrix else "")
    return publish_onnx_variant(
        store, parent_ref, name or f"{parent.name}-{suffix}", transform,
        kind="quantized", precision="int8", recipe={"variant": suffix}, log=log,
    )  # fmt: skip


def int4_suffix(block_size: int | None) -> str:
    """`int4` (one scale per output column) or `int4-b<block_size>`."""
    return "int4" if block_size is None else f"int4-b{block_size}"


def int4_variant(
    store: ModelStore,
    parent_ref: str,
    block_size: int | None = DEFAULT_BLOCK_SIZE,
    name: str | None = None,
    log: Callable[[str], None] = print,
) -> Manifest:
    """4-bit weights (`compression.quantize.int4`): int4 item rows and block MatMuls, one
    scale per output column (`block_size=None`) or per block of `block_size` inputs."""
    from compression.quantize.int4 import quantize_int4

    def transform(src: Path, dst: Path, split: Split) -> dict[str, Any]:
        report = quantize_int4(src, dst, block_size)
        return {
            "int4": {"block_size": block_size},
            "int4_matmuls": report.matmuls,
            "int4_tables": list(report.tables),
        }

    parent, _ = store.load(parent_ref)
    return publish_onnx_variant(
        store, parent_ref, name or f"{parent.name}-{int4_suffix(block_size)}", transform,
        kind="quantized", precision="int4", recipe={"variant": "int4"}, log=log,
    )  # fmt: skip


def fp16_variant(
    store: ModelStore, parent_ref: str, name: str | None = None, log: Callable[[str], None] = print
) -> Manifest:
    """The graph in float16 with int64 ids in and float32 scores out (for GPU execution)."""
    from compression.quantize.fp16 import convert_fp16

    def transform(src: Path, dst: Path, split: Split) -> dict[str, Any]:
        convert_fp16(src, dst)
        return {"io_types": "int64 in, float32 out (unchanged)"}

    parent, _ = store.load(parent_ref)
    return publish_onnx_variant(
        store, parent_ref, name or f"{parent.name}-fp16", transform,
        kind="fp16", precision="fp16", recipe={"variant": "fp16"}, log=log,
    )  # fmt: skip


def prune_variant(
    store: ModelStore,
    parent_ref: str,
    cfg: Any,
    *,
    name: str | None = None,
    train_cfg: Any = None,
    distill_cfg: Any = None,
    log: Callable[[str], None] = print,
) -> Manifest:
    """Structured/magnitude pruning of a stored PyTorch model (`cfg`: `PruneConfig`), with a
    distillation fine-tune from the unpruned parent; evaluated and published like any model."""
    import time

    from compression.evaluate.metrics import evaluate_model
    from compression.model.prune import prune
    from compression.model.train import TrainResult, load_checkpoint, stored_checkpoint
    from compression.pipeline import evaluate_and_publish

    parent, folder = store.load(parent_ref)
    _refuse_bidirectional(parent, "pruning (its importance scores use next-item training)")
    checkpoint = stored_checkpoint(parent, folder, "prune")
    data, split = model_split(parent)
    model = load_checkpoint(checkpoint).eval()
    started = time.perf_counter()
    result = prune(model, cfg, split, train_cfg, distill_cfg, log=log)
    tuned = result.fine_tune
    trained = tuned or TrainResult(
        model=result.model.eval(),
        best_epoch=0,
        epochs_run=0,
        wall_s=0.0,
        best_valid=evaluate_model(result.model, split, "valid"),
        stopped_by="no_fine_tune",
    )
    extra: dict[str, float] = {"parent_params": parent.metrics.get("params", 0.0)}
    if result.sparsity is not None:
        extra["sparsity"] = result.sparsity.reached
        extra["dense_bytes"] = float(result.sparsity.model_dense_bytes)
        extra["sparse_csr_bytes"] = float(result.sparsity.model_sparse_bytes)
    teacher_ndcg = parent.metrics.get("teacher_test_ndcg@10") or parent.metrics.get("test_ndcg@10")
    if teacher_ndcg:
        extra["teacher_test_ndcg@10"] = teacher_ndcg
    recipe = {
        "prune": cfg.model_dump(),
        "data": parent.recipe.get("data", {}),
        "removed": [] if result.structured is None else [
            f"{r.kind} {r.index} of block {r.block}" for r in result.structured.removed
        ],
    }  # fmt: skip
    report = evaluate_and_publish(
        store, name or f"{parent.name}-pruned", trained, data, split,
        kind="pruned", parent=f"{parent.name}@{parent.version}", recipe=recipe,
        wall_s=time.perf_counter() - started, extra_metrics=extra,
    )  # fmt: skip
    return report.manifest


# Quantization-aware fine-tuning: the fp32 model teaches its fake-quantized copy with the
# headline student's loss (KL on the teacher's top 128 at T = 1, plus labels), at a small share
# of the training lr: the weights only have to settle on the int4 grid, not learn anew.
QAT_DISTILL = {"strategy": "fixed", "alpha": 1.0, "temperature": 1.0, "beta": 1.0, "top_k": 128}
# A twentieth of the model's lr: at a quarter, the ML-1M 3/16 student's validation fell after
# the first epoch and its int4 kept 96.4% of the teacher (seed 0); at a twentieth, 99.3%
# (docs/results/2026-12-06-int4-ml1m.md).
QAT_LR_FACTOR = 0.05


def qat_variant(
    store: ModelStore,
    parent_ref: str,
    epochs: int,
    block_size: int | None = DEFAULT_BLOCK_SIZE,
    *,
    name: str | None = None,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> Manifest:
    """Quantization-aware fine-tuning of a stored PyTorch model for 4-bit weights, then its
    int4 variant. The model is fine-tuned `epochs` epochs with fake int4 weights
    (`compression.model.fake_quant`) by distillation from itself in fp32; the epoch with the
    best validation NDCG@10 is kept, its weights are rounded to the int4 grid and published
    as `<parent>-qat[-b<block>]` (fp32 file, exactly representable in int4), and `int4_variant`
    stores it in 4 bits as `name` (default `<parent>-qat-int4[-b<block>]`)."""
    import time

    import torch

    from compression.configs import DistillConfig, TrainConfig
    from compression.distill.fine_tune import fine_tune
    from compression.model.fake_quant import add_int4_fake_quant, bake_int4_fake_quant
    from compression.model.train import load_checkpoint, stored_checkpoint
    from compression.pipeline import evaluate_and_publish

    if epochs < 1:
        raise ValueError(f"qat epochs={epochs}: at least 1")
    parent, folder = store.load(parent_ref)
    _refuse_bidirectional(parent, "--qat-epochs (use post-training int4)")
    checkpoint = stored_checkpoint(parent, folder, "fine-tune for int4")
    data, split = model_split(parent)
    teacher = load_checkpoint(checkpoint).eval()
    student = load_checkpoint(checkpoint)
    add_int4_fake_quant(student, block_size)
    stored_train = parent.recipe.get("train") or {}
    train_cfg = TrainConfig(
        **{
            **{k: v for k, v in stored_train.items() if k in TrainConfig.model_fields},
            "max_epochs": epochs,
            "patience": epochs,
            "max_lr_decays": 0,
            "time_limit_s": None,
            "loss": "full",
            "lr": float(stored_train.get("lr", TrainConfig().lr)) * QAT_LR_FACTOR,
            # A few epochs: an average would mostly hold the weights from before the grid.
            "ema_epochs": None,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
        }
    )
    started = time.perf_counter()
    result = fine_tune(
        student, teacher, split, train_cfg, DistillConfig(**QAT_DISTILL),
        teacher_valid_ndcg=parent.metrics.get("valid_ndcg@10", 0.0), progress=progress, log=log,
    )  # fmt: skip
    bake_int4_fake_quant(result.model)
    extra = {"parent_params": parent.metrics.get("params", 0.0)}
    teacher_ndcg = parent.metrics.get("teacher_test_ndcg@10") or parent.metrics.get("test_ndcg@10")
    if teacher_ndcg:
        extra["teacher_test_ndcg@10"] = teacher_ndcg
    qat = {"epochs": epochs, "block_size": block_size, "lr": train_cfg.lr, "distill": QAT_DISTILL}
    block = "" if block_size is None else f"-b{block_size}"
    tuned = evaluate_and_publish(
        store, f"{parent.name}-qat{block}", result, data, split, kind="qat",
        parent=f"{parent.name}@{parent.version}",
        recipe={"qat": qat, "train": train_cfg.model_dump(), "data": parent.recipe.get("data", {})},
        wall_s=time.perf_counter() - started, extra_metrics=extra,
    )  # fmt: skip
    ref = f"{tuned.manifest.name}@{tuned.manifest.version}"
    name = name or f"{parent.name}-qat-{int4_suffix(block_size)}"
    return int4_variant(store, ref, block_size, name=name, log=log)


def context_variant(
    store: ModelStore,
    parent_ref: str,
    max_len: int,
    *,
    name: str | None = None,
    log: Callable[[str], None] = print,
) -> Manifest:
    """The same graph reading only the most recent `max_len` items.

    Positions count from the start of the window, so a shorter window is a valid input the
    model has seen in training (every user once had that few items); attention and the
    block MatMuls shrink with the window. On ML-1M the teacher kept 98% of its NDCG@10 at 50
    items of 200 while its batch-64 latency fell ~6x.
    """
    parent, _ = store.load(parent_ref)
    _refuse_bidirectional(parent, "a shorter context (the [mask] slot is part of its window)")
    if max_len >= int(parent.architecture["max_len"]):
        raise ValueError(
            f"{parent_ref}: context {max_len} is not shorter than its "
            f"{parent.architecture['max_len']}"
        )

    def transform(src: Path, dst: Path, split: Split) -> dict[str, Any]:
        shutil.copy(src, dst)
        return {"context": max_len}

    precision = (
        parent.artifacts["model.onnx"].precision if "model.onnx" in parent.artifacts else "fp32"
    )
    return publish_onnx_variant(
        store, parent_ref, name or f"{parent.name}-ctx{max_len}", transform,
        kind="context", precision=precision, recipe={"variant": f"context {max_len}"},
        max_len=max_len, log=log,
    )  # fmt: skip
