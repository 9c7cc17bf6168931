"""Jobs composed from the pieces: train a teacher, evaluate it, publish it to the store."""

from __future__ import annotations

import ctypes
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compression.configs import DataSpec, TeacherRecipe
from compression.data import SequenceDataset, Split, leave_one_out, load_dataset
from compression.evaluate import evaluate_model, evaluate_popularity
from model_store.manifest import DatasetInfo, Manifest
from model_store.store import ModelStore

METRIC_KEYS = ("hr@10", "ndcg@10", "hr@20", "ndcg@20", "mrr")


def tune_allocator() -> None:
    """Keep freed chunks (logit blocks of ~30 MB) in the heap instead of returning them.

    glibc's default hands large blocks back to the kernel at once, and every reallocation
    then pays page faults: about a tenth of a training step's time here.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)
    libc.mallopt(m_trim_threshold, 4 * 1024 * 1024 * 1024 - 1)


def load_from_spec(spec: DataSpec) -> SequenceDataset:
    kwargs: dict[str, Any] = {}
    if Path(spec.path).suffix.lower() in {".dat", ".csv", ".parquet"}:
        kwargs = {
            "fmt": spec.fmt,
            "user_col": spec.user_col,
            "item_col": spec.item_col,
            "time_col": spec.time_col,
            "min_user_count": spec.min_user_count,
            "min_item_count": spec.min_item_count,
        }
    return load_dataset(spec.path, **kwargs)


def dataset_info(data: SequenceDataset) -> DatasetInfo:
    return DatasetInfo(
        name=data.name,
        sha256=data.sha256,
        n_users=data.n_users,
        n_items=data.n_items,
        n_interactions=data.n_interactions,
    )


def prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}_{k}": float(metrics[k]) for k in METRIC_KEYS}


@dataclass
class TeacherReport:
    manifest: Manifest
    test: dict[str, float]
    valid: dict[str, float]
    popularity_test: dict[str, float]
    params: int
    epochs: int
    best_epoch: int
    wall_s: float
    stopped_by: str


def signature(n_items: int) -> dict[str, Any]:
    return {
        "inputs": [{"name": "item_ids", "dtype": "int64", "shape": ["batch", "length"]}],
        "outputs": [{"name": "scores", "dtype": "float32", "shape": ["batch", n_items + 1]}],
    }


def train_teacher(
    recipe: TeacherRecipe,
    store: ModelStore,
    progress: bool = True,
    log: Callable[[str], None] = print,
    data: SequenceDataset | None = None,
    split: Split | None = None,
) -> TeacherReport:
    """Load data, train, evaluate (valid, test, popularity) and publish atomically."""
    from compression.train import save_checkpoint, train

    tune_allocator()
    data = data or load_from_spec(recipe.data)
    split = split or leave_one_out(data)
    model_cfg = recipe.model_config_for(data.n_items)
    log(f"data {json.dumps(data.summary())}")
    started = time.perf_counter()
    result = train(model_cfg, recipe.train, split, progress=progress, log=log)
    wall_s = time.perf_counter() - started
    test = evaluate_model(result.model, split, "test", recipe.train.eval_batch_size)
    valid = result.best_valid
    popularity = evaluate_popularity(split, "test")
    params = result.model.num_parameters()
    metrics = {
        **prefixed("test", test),
        **prefixed("valid", valid),
        **prefixed("popularity_test", popularity),
        "params": float(params),
        "epochs": float(result.epochs_run),
        "best_epoch": float(result.best_epoch),
        "train_wall_s": round(wall_s, 1),
    }
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, items = Path(tmp) / "model.pt", Path(tmp) / "items.json"
        save_checkpoint(ckpt, result.model, extra={"dataset_sha256": data.sha256})
        data.save_item_mapping(items)
        manifest = store.publish(
            recipe.name,
            {"model.pt": ckpt, "items.json": items},
            kind="teacher",
            parent=None,
            architecture=model_cfg.model_dump(),
            recipe={**recipe.model_dump(), "stopped_by": result.stopped_by},
            dataset=dataset_info(data),
            metrics=metrics,
            signature=signature(data.n_items),
        )
    return TeacherReport(
        manifest=manifest,
        test=test,
        valid=valid,
        popularity_test=popularity,
        params=params,
        epochs=result.epochs_run,
        best_epoch=result.best_epoch,
        wall_s=wall_s,
        stopped_by=result.stopped_by,
    )
