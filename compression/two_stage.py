"""Two-stage variants of a stored model, for catalogues too large to score in full.

The variant's `model.onnx` maps a history to the user vector; the item matrix (fp32, or int8
with one scale per row) is its own artifact, optionally with a FAISS index built at publish
time (`model_store.two_stage`). It is evaluated with the project's protocol (full ranking,
the user's history masked) on the scores the service computes: the user vector times the
matrix as stored. With an index, recall@10 of the index against the exact top 10 is measured
on test users and recorded.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from compression.data.sequences import Split
from compression.evaluate.metrics import eval_batch_size, evaluate_scorer, score_all
from compression.export.exporter import INPUT_NAME, USER_VECTOR_NAME, export_user_model
from compression.pipeline import PARITY_SEQUENCES, model_split, prefixed
from model_store.item_matrix import quantize_rows
from model_store.manifest import Manifest
from model_store.runtime import ort_session
from model_store.store import ITEM_MAPPING, ModelStore
from model_store.two_stage import TwoStageFiles, write_two_stage

RECALL_USERS = 1000  # test users the index's recall@10 is measured on


def stored_matrix(matrix: np.ndarray, precision: Literal["fp32", "int8"]) -> np.ndarray:
    """The matrix the service scores with: fp32 as is, int8 rows times their scales."""
    if precision == "fp32":
        return matrix
    rows, scales = quantize_rows(matrix)
    return rows.astype(np.float32) * scales[:, None]


def two_stage_variant(
    store: ModelStore,
    parent_ref: str,
    *,
    precision: Literal["fp32", "int8"] = "int8",
    index: Mapping[str, Any] | None = None,
    name: str | None = None,
    log: Callable[[str], None] = print,
) -> Manifest:
    """Publish `parent_ref` (a stored PyTorch model) as a two-stage variant."""
    from compression.model.train import load_checkpoint, stored_checkpoint

    parent, folder = store.load(parent_ref)
    model = load_checkpoint(stored_checkpoint(parent, folder, "publish two-stage")).eval()
    _, split = model_split(parent)
    matrix = model.item_emb.weight.detach().float().numpy()
    name = name or f"{parent.name}-two-stage-{precision}" + (f"-{index['type']}" if index else "")
    histories = split.eval_inputs("test")[0]
    store.root.mkdir(parents=True, exist_ok=True)
    # Beside the store's own temporary folders: the matrix can be gigabytes.
    with tempfile.TemporaryDirectory(prefix=".two-stage-", dir=store.root) as tmp:
        user_model = Path(tmp) / "model.onnx"
        parity = export_user_model(model, user_model, histories[:PARITY_SEQUENCES])
        users = _user_vectors(user_model)
        scored = stored_matrix(matrix, precision)
        max_len = model.cfg.max_len
        test = evaluate_scorer(
            lambda x: users(x) @ scored.T, split, "test", max_len, eval_batch_size(split.n_items)
        )
        metrics = {
            **prefixed("test", test),
            "params": float(model.num_parameters()),
            "parity_max_abs_diff": parity,
        }
        if parent.metrics.get("test_ndcg@10"):
            metrics["ndcg_retention_vs_parent"] = test["ndcg@10"] / parent.metrics["test_ndcg@10"]
        log(f"{name}: test ndcg@10 {test['ndcg@10']:.4f} (parent "
            f"{parent.metrics.get('test_ndcg@10')}), {precision} item matrix")  # fmt: skip
        # Written here (not by publish_two_stage) so the index is measured before publishing.
        written = write_two_stage(Path(tmp), matrix, precision=precision, index=index)
        if written.index_build_s is not None:
            metrics["index_build_s"] = round(written.index_build_s, 3)
            metrics["index_recall@10"] = index_recall(written, users, scored, split, max_len)
            log(f"{name}: index recall@10 against the exact top 10: "
                f"{metrics['index_recall@10']:.4f}")  # fmt: skip
        files = {"model.onnx": user_model, ITEM_MAPPING: folder / parent.item_mapping}
        return store.publish(
            name, {**files, **written.files}, kind=f"two-stage-{precision}",
            parent=f"{parent.name}@{parent.version}", architecture=parent.architecture,
            recipe={"two_stage": {"precision": precision, "index": dict(index or {})},
                    "data": parent.recipe.get("data", {})},
            dataset=parent.dataset, metrics=metrics, signature=parent.signature,
            formats=written.formats, scorer=written.scorer,
        )  # fmt: skip


def _user_vectors(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    session = ort_session(path, threads=None)

    def run(batch: np.ndarray) -> np.ndarray:
        return session.run([USER_VECTOR_NAME], {INPUT_NAME: batch})[0]

    return run


def index_recall(
    written: TwoStageFiles,
    users: Callable[[np.ndarray], np.ndarray],
    scored: np.ndarray,
    split: Split,
    max_len: int,
    k: int = 10,
) -> float:
    """Mean |index top-k ∩ exact top-k| / k over up to `RECALL_USERS` test users (rows
    1..n_items, no exclusion: what the index itself finds)."""
    from model_store.ann_index import read_index

    scorer = written.scorer
    assert scorer.index is not None and scorer.index_params is not None
    index = read_index(written.files[scorer.index], scorer.index_params, scorer.dim, split.n_items)
    histories = split.eval_inputs("test")[0][:RECALL_USERS]
    vectors = np.ascontiguousarray(score_all(users, histories, max_len), dtype=np.float32)
    _, found = index.search(vectors, k)
    hits = []
    step = eval_batch_size(split.n_items)  # a block of exact scores stays ~128 MB
    for start in range(0, len(vectors), step):
        block = vectors[start : start + step] @ scored[1:].T
        exact = np.argpartition(-block, k, axis=1)[:, :k]
        near = found[start : start + len(exact)].tolist()
        hits += [len(set(a) & set(b)) for a, b in zip(exact.tolist(), near, strict=True)]
    return float(np.mean(hits)) / k
