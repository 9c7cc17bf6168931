"""Publish a two-stage variant: user-vector ONNX model + item matrix (+ optional ANN index).

The offline side calls `publish_two_stage` (or `write_two_stage` and then
`ModelStore.publish` itself). The ONNX model maps the left-padded int64 history
`item_ids [batch, length]` (0 = padding) to `user_vector [batch, dim]` float32; the score of
item i is the inner product of the user vector with row i of the item matrix.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from model_store.ann_index import INDEX_FILE, build_index, write_index
from model_store.item_matrix import (
    DEFAULT_BLOCK_ROWS,
    ITEM_MATRIX_FILE,
    ITEM_SCALES_FILE,
    ItemMatrix,
    ItemMatrixError,
    open_item_matrix,
    write_item_matrix,
)
from model_store.manifest import (
    DatasetInfo,
    HnswParams,
    IvfParams,
    Manifest,
    ScorerInfo,
    Signature,
)
from model_store.store import ITEM_MAPPING, ModelStore

USER_MODEL_FILE = "model.onnx"


@dataclass(frozen=True)
class TwoStageFiles:
    """What `write_two_stage` wrote: pass all three to `ModelStore.publish`."""

    files: dict[str, Path]  # store name -> path
    formats: dict[str, tuple[str, str]]  # store name -> (format, precision)
    scorer: ScorerInfo
    index_build_s: float | None  # seconds spent building the index (None without one)


def write_two_stage(
    folder: Path,
    item_matrix: np.ndarray,
    *,
    precision: Literal["fp32", "int8"] = "int8",
    index: HnswParams | IvfParams | Mapping[str, Any] | None = None,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    threads: int = 1,
) -> TwoStageFiles:
    """Write the item matrix `[n_items + 1, dim]` (row 0 = padding) as `precision`, and with
    `index` (e.g. `{"type": "hnsw", "m": 32, "ef_construction": 200, "ef_search": 128}`) an
    inner-product FAISS index over the rows as stored (int8 rows dequantized)."""
    params = _index_params(index)
    files = write_item_matrix(folder, item_matrix, precision, block_rows)
    formats = {name: ("npy", precision) for name in files}
    if ITEM_SCALES_FILE in formats:
        formats[ITEM_SCALES_FILE] = ("npy", "fp32")
    n_items, dim = item_matrix.shape[0] - 1, item_matrix.shape[1]
    scorer_fields: dict[str, Any] = {
        "kind": "exact",
        "dim": dim,
        "precision": precision,
        "block_rows": block_rows,
        "item_matrix": ITEM_MATRIX_FILE,
        "item_scales": ITEM_SCALES_FILE if precision == "int8" else None,
    }
    build_s = None
    if params is not None:
        stored = open_item_matrix(folder, ScorerInfo(**scorer_fields), n_items)
        started = time.perf_counter()
        built = build_index(_stored_rows(stored, n_items), params, threads)
        build_s = time.perf_counter() - started
        files[INDEX_FILE] = folder / INDEX_FILE
        write_index(built, files[INDEX_FILE])
        formats[INDEX_FILE] = ("faiss", "fp32")
        scorer_fields.update(kind="ann", index=INDEX_FILE, index_params=params)
    return TwoStageFiles(files, formats, ScorerInfo(**scorer_fields), build_s)


def publish_two_stage(
    store: ModelStore,
    name: str,
    *,
    user_model: Path,
    item_ids: Path,
    item_matrix: np.ndarray,
    kind: str,
    parent: str | None,
    architecture: Mapping[str, Any],
    recipe: Mapping[str, Any],
    dataset: DatasetInfo | Mapping[str, Any],
    metrics: Mapping[str, float],
    precision: Literal["fp32", "int8"] = "int8",
    index: HnswParams | IvfParams | Mapping[str, Any] | None = None,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    threads: int = 1,
    signature: Signature | Mapping[str, Any] | None = None,
) -> Manifest:
    """Publish `user_model` (ONNX: `item_ids` -> `user_vector`), the item-id mapping
    `item_ids` (an `items.json`) and `item_matrix` as a new version of `name`; the metadata
    arguments are `ModelStore.publish`'s. The index build time is added to the metrics as
    `index_build_s`."""
    info = dataset if isinstance(dataset, DatasetInfo) else DatasetInfo.model_validate(dataset)
    if item_matrix.shape[0] != info.n_items + 1:
        raise ItemMatrixError(
            f"item matrix has {item_matrix.shape[0]} rows; the data set has {info.n_items} "
            f"items, so it needs {info.n_items + 1} (row 0 is the padding id)"
        )
    store.root.mkdir(parents=True, exist_ok=True)
    # Inside the store root, beside the store's own temporary folders (readers skip names
    # starting with "."): the item matrix can be gigabytes, too large for a RAM-backed /tmp.
    with tempfile.TemporaryDirectory(prefix=".two-stage-", dir=store.root) as tmp:
        written = write_two_stage(
            Path(tmp), item_matrix, precision=precision, index=index,
            block_rows=block_rows, threads=threads,
        )  # fmt: skip
        files = {USER_MODEL_FILE: Path(user_model), ITEM_MAPPING: Path(item_ids), **written.files}
        all_metrics = dict(metrics)
        if written.index_build_s is not None:
            all_metrics["index_build_s"] = round(written.index_build_s, 3)
        return store.publish(
            name, files, kind=kind, parent=parent, architecture=architecture, recipe=recipe,
            dataset=info, metrics=all_metrics, signature=signature, formats=written.formats,
            scorer=written.scorer,
        )  # fmt: skip


def _index_params(
    index: HnswParams | IvfParams | Mapping[str, Any] | None,
) -> HnswParams | IvfParams | None:
    if index is None or isinstance(index, HnswParams | IvfParams):
        return index
    kind = dict(index).get("type")
    model = {"hnsw": HnswParams, "ivf": IvfParams}.get(kind)  # type: ignore[arg-type]
    if model is None:
        raise ValueError(f"index type {kind!r}: use 'hnsw' or 'ivf'")
    return model(**index)


def _stored_rows(stored: ItemMatrix, n_items: int, chunk: int = 1 << 16) -> np.ndarray:
    """Rows 1..n_items as the service scores them (float32), gathered chunk by chunk."""
    out = np.empty((n_items, stored.dim), dtype=np.float32)
    for start in range(1, n_items + 1, chunk):
        ids = np.arange(start, min(n_items + 1, start + chunk))
        out[start - 1 : start - 1 + len(ids)] = stored.rows(ids)
    return out
