"""Two-stage artifacts: int8 rows, the manifest's scorer, checksums and malformed .npy files."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.model import LoadedModel, ModelLoadError
from model_store import ManifestError, ModelStore, StoreError, load_manifest
from model_store.ann_index import AnnIndexError, build_index, read_index, write_index
from model_store.item_matrix import (
    ItemMatrixError,
    open_item_matrix,
    quantize_rows,
    write_item_matrix,
)
from model_store.manifest import HnswParams, IvfParams, ScorerInfo
from tests.conftest import REPO_ROOT
from tests.two_stage import publish_two_stage_variant

HNSW = {"type": "hnsw", "m": 8, "ef_construction": 32, "ef_search": 32}


def table(n_items: int = 300, dim: int = 8, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((n_items + 1, dim)).astype(np.float32)
    rows[0] = 0
    return rows


def ids(n_items: int = 300) -> list[str]:
    return [f"SKU-{i:05d}" for i in range(n_items)]


def test_int8_rows_are_symmetric_per_row_with_scale_max_over_127() -> None:
    rows = np.array([[0, 0, 0], [1.0, -2.0, 0.5], [254.0, 127.0, -0.9]], dtype=np.float32)
    q, scale = quantize_rows(rows)
    np.testing.assert_allclose(scale, [1.0, 2.0 / 127, 2.0])  # an all-zero row gets 1
    assert q.dtype == np.int8 and q[1].tolist() == [64, -127, 32] and q[2].tolist() == [127, 64, 0]


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_stored_layout_round_trips_through_a_memory_map(tmp_path: Path, precision: str) -> None:
    rows = table(n_items=10, dim=3)
    files = write_item_matrix(tmp_path, rows, precision, block_rows=4)  # 11 rows: 3 blocks
    info = ScorerInfo(kind="exact", dim=3, precision=precision, block_rows=4,
                      item_matrix="item_matrix.npy",
                      item_scales="item_scales.npy" if precision == "int8" else None)  # fmt: skip
    stored = open_item_matrix(tmp_path, info, n_items=10)
    assert isinstance(stored.blocks, np.memmap) and stored.blocks.shape == (3, 3, 4)
    assert set(files) == ({"item_matrix.npy", "item_scales.npy"} if precision == "int8"
                          else {"item_matrix.npy"})  # fmt: skip
    want = rows
    if precision == "int8":
        q, scale = quantize_rows(rows)
        want = q.astype(np.float32) * scale[:, None]
    np.testing.assert_array_equal(stored.rows(np.arange(11)), want)
    assert (stored.blocks[2, :, 3:] == 0).all()  # the padding of the last block


def test_publish_two_stage_writes_a_schema_2_manifest_naming_its_scorer(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    manifest = publish_two_stage_variant(store, "ts", table(), ids(), index=HNSW, block_rows=64)
    assert manifest.schema_version == 2
    scorer = manifest.scorer
    assert scorer is not None and scorer.kind == "ann" and scorer.precision == "int8"
    assert scorer.index_params == HnswParams(**HNSW)
    assert {"model.onnx", "items.json", "item_matrix.npy", "item_scales.npy",
            "item_index.faiss"} == set(manifest.artifacts)  # fmt: skip
    assert manifest.artifacts["item_index.faiss"].format == "faiss"
    assert manifest.artifacts["item_matrix.npy"].precision == "int8"
    assert "index_build_s" in manifest.metrics
    assert load_manifest(store.root / "ts" / "1" / "manifest.json") == manifest


def test_a_full_score_publish_stays_schema_1(tmp_path: Path) -> None:
    """Older services read schema 1 only: what needs no scorer is still written as 1."""
    src = tmp_path / "items.json"
    src.write_text("[]")
    store = ModelStore(tmp_path / "store")
    manifest = store.publish(
        "plain", {"items.json": src, "model.onnx": src}, kind="teacher", parent=None,
        architecture={}, recipe={}, metrics={},
        dataset={"name": "d", "sha256": "0" * 64, "n_users": 1, "n_items": 1,
                 "n_interactions": 1},
    )  # fmt: skip
    assert manifest.schema_version == 1 and manifest.scorer is None


def manifest_with(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    store = ModelStore(tmp_path / "store")
    manifest = publish_two_stage_variant(store, "ts", table(n_items=20), ids(20), block_rows=8)
    data = json.loads(manifest.to_json())
    for key, value in changes.items():
        if key.startswith("scorer."):
            data["scorer"][key.removeprefix("scorer.")] = value
        else:
            data[key] = value
    return data


def load_error(tmp_path: Path, data: dict[str, Any]) -> str:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    return str(info.value)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"schema_version": 1}, "key 'scorer' needs schema_version 2"),
        ({"scorer.item_scales": None}, "item_scales is required for precision 'int8'"),
        ({"scorer.kind": "ann"}, "kind 'ann' needs index and index_params"),
        ({"scorer.item_matrix": "other.npy"}, "scorer names 'other.npy'"),
        ({"scorer.kind": "full"}, "scorer.kind"),
        ({"scorer.layout": "rows"}, "unknown key 'layout' in scorer"),
    ],
)
def test_bad_scorer_manifests_are_refused_with_the_reason(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    assert message in load_error(tmp_path, manifest_with(tmp_path, **changes))


def test_a_schema_1_manifest_with_an_unknown_key_lists_the_schema_1_keys(tmp_path: Path) -> None:
    data = manifest_with(tmp_path)
    data.pop("scorer")
    data["schema_version"] = 1
    data["extra"] = 1
    message = load_error(tmp_path, data)
    assert "schema_version 1 allows:" in message and "scorer" not in message


def test_unknown_index_type_is_refused(tmp_path: Path) -> None:
    data = manifest_with(tmp_path, **{"scorer.kind": "ann", "scorer.index": "items.json"})
    data["scorer"]["index_params"] = {"type": "lsh", "bits": 8}
    assert "index_params" in load_error(tmp_path, data)


@pytest.mark.parametrize("artifact", ["item_matrix.npy", "item_scales.npy", "item_index.faiss"])
def test_a_flipped_byte_in_a_scorer_artifact_is_refused(tmp_path: Path, artifact: str) -> None:
    store = ModelStore(tmp_path / "store")
    publish_two_stage_variant(store, "ts", table(), ids(), index=HNSW, block_rows=64)
    path = store.root / "ts" / "1" / artifact
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=f"'{artifact}' fails its sha256 check"):
        store.load("ts")
    with pytest.raises(ModelLoadError, match=f"ts: cannot be served: .*'{artifact}' fails"):
        LoadedModel(store, "ts", "auto", 1, [8])


SCORER = ScorerInfo(kind="exact", dim=3, precision="fp32", block_rows=4,
                    item_matrix="item_matrix.npy")  # fmt: skip


class Payload:
    """Unpickling this runs code: a loader that unpickles would set the flag."""

    ran = False

    def __reduce__(self) -> tuple[Any, ...]:
        return (setattr, (Payload, "ran", True))


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((3, 3, 4), dtype=np.float64), "dtype <f8 but the manifest needs <f4"),
        (np.zeros((3, 3, 4), dtype=">f4"), "dtype >f4 but the manifest needs <f4"),
        (np.zeros((3, 4, 3), dtype=np.float32), "shape (3, 4, 3) in C order"),
        (np.zeros((11, 3), dtype=np.float32), "shape (11, 3)"),
        (np.asfortranarray(np.zeros((3, 3, 4), dtype=np.float32)), "in Fortran order"),
        (np.array([Payload()] * 36, dtype=object).reshape(3, 3, 4), "dtype |O"),
    ],
    ids=["float64", "big-endian", "transposed", "rows-layout", "fortran", "object"],
)
def test_malformed_npy_is_refused_and_never_unpickled(
    tmp_path: Path, array: np.ndarray, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    np.save(tmp_path / "item_matrix.npy", array, allow_pickle=True)
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
    with pytest.raises(ItemMatrixError, match="publish the variant again") as info:
        open_item_matrix(tmp_path, SCORER, n_items=10)
    assert message in str(info.value)
    assert not Payload.ran


@pytest.mark.parametrize("damage", ["truncated", "not-npy", "missing"])
def test_truncated_or_foreign_files_are_refused(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "item_matrix.npy"
    np.save(path, np.zeros((3, 3, 4), dtype=np.float32))
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-4])
    elif damage == "not-npy":
        path.write_bytes(b"PK\x03\x04 a zip, not an array")
    else:
        path.unlink()
    with pytest.raises(ItemMatrixError, match=r"item_matrix\.npy"):
        open_item_matrix(tmp_path, SCORER, n_items=10)


def test_a_checksummed_but_mismatched_matrix_is_refused_at_load(tmp_path: Path) -> None:
    """A publisher bug (right checksum, wrong shape) stops the variant from loading."""
    store = ModelStore(tmp_path / "store")
    src = tmp_path / "src"
    written = publish_two_stage_variant(store, "ts", table(), ids(), block_rows=64)
    src.mkdir()
    np.save(src / "item_matrix.npy", np.zeros((4, 8, 64), dtype=np.int8))
    files = {name: store.root / "ts" / "1" / name for name in written.artifacts}
    files["item_matrix.npy"] = src / "item_matrix.npy"
    assert written.scorer is not None
    store.publish(
        "ts", files, kind="two-stage", parent=None, architecture=written.architecture,
        recipe={}, dataset=written.dataset, metrics={}, scorer=written.scorer,
        formats={n: (a.format, a.precision) for n, a in written.artifacts.items()},
    )  # fmt: skip
    with pytest.raises(
        ModelLoadError,
        match=r"ts@2.*shape \(4, 8, 64\) in C order but the manifest needs \(5, 8, 64\)",
    ):
        LoadedModel(store, "ts@2", "auto", 1, [8])


def test_an_index_that_does_not_match_the_manifest_is_refused(tmp_path: Path) -> None:
    vectors = table(n_items=100, dim=8)[1:]
    params = IvfParams(type="ivf", nlist=4, nprobe=2, encoding="flat")
    write_index(build_index(vectors, params), tmp_path / "index.faiss")
    read_index(tmp_path / "index.faiss", params, dim=8, n_items=100)  # as published: fine
    with pytest.raises(AnnIndexError, match="dimension 8, manifest says 16"):
        read_index(tmp_path / "index.faiss", params, dim=16, n_items=100)
    with pytest.raises(AnnIndexError, match="100 vectors, the catalogue has 101"):
        read_index(tmp_path / "index.faiss", params, dim=8, n_items=101)
    hnsw = HnswParams(type="hnsw", m=8, ef_construction=8, ef_search=8)
    with pytest.raises(AnnIndexError, match="manifest says hnsw"):
        read_index(tmp_path / "index.faiss", hnsw, dim=8, n_items=100)


def test_serving_two_stage_imports_neither_torch_nor_compression() -> None:
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['compression'] = None\n"
        "import app.scorers, app.exact_scorer, app.ann_scorer, model_store.two_stage\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, cwd=REPO_ROOT)  # fmt: skip
    assert result.returncode == 0, result.stderr
