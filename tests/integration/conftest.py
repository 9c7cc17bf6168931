"""A temporary model store with tiny exported models, for serving tests."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from compression.configs import ModelConfig
from compression.export.exporter import export_onnx
from compression.model.sasrec import SASRec
from model_store import ModelStore

N_ITEMS = 40
MAX_LEN = 8
ORIGINAL_IDS = [1000 + i for i in range(N_ITEMS)]  # internal id i+1 <-> original 1000+i
# Popularity decreases with the id except item 1039, the most popular of all.
COUNTS = [N_ITEMS - i for i in range(N_ITEMS - 1)] + [500]


def publish_tiny(
    store: ModelStore, name: str, seed: int, hidden: int = 16, metrics: dict | None = None
) -> None:
    torch.manual_seed(seed)
    cfg = ModelConfig(n_items=N_ITEMS, max_len=MAX_LEN, hidden=hidden, n_heads=2, n_blocks=1)
    model = SASRec(cfg).eval()
    folder = store.root / f".build-{name}-{seed}"
    folder.mkdir(parents=True)
    export_onnx(model, folder / "model.onnx")
    (folder / "items.json").write_text(
        json.dumps(
            {
                "format": "recsys-item-mapping/1",
                "n_items": N_ITEMS,
                "item_ids": [str(i) for i in ORIGINAL_IDS],
                "counts": COUNTS,
            }
        )
    )
    store.publish(
        name,
        {"model.onnx": folder / "model.onnx", "items.json": folder / "items.json"},
        kind="teacher" if hidden == 16 else "student",
        parent=None,
        architecture=cfg.model_dump(),
        recipe={"seed": seed},
        dataset={
            "name": "tiny",
            "sha256": "0" * 64,
            "n_users": 1,
            "n_items": N_ITEMS,
            "n_interactions": 1,
        },
        metrics={
            "test_ndcg@10": 0.2 if hidden == 16 else 0.19,
            "test_hr@10": 0.3,
            "params": float(model.num_parameters()),
            **(metrics or {}),
        },
    )


def tiny_store(root: Path) -> Path:
    """`tiny@1`, `tiny@2` (other weights) and `tiny-small@1` (smaller student) in `root`."""
    store = ModelStore(root)
    publish_tiny(store, "tiny", seed=0)
    publish_tiny(store, "tiny", seed=1)
    publish_tiny(store, "tiny-small", seed=2, hidden=8)
    return root


@pytest.fixture(scope="session")
def serving_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_store(tmp_path_factory.mktemp("store"))


def wait_ready(client: TestClient, timeout_s: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = client.get("/readyz")
        if r.status_code == 200:
            return r.json()
        time.sleep(0.02)
    raise AssertionError(f"service not ready: {r.json()}")


def reference_scores(store_root: Path, ref: str, internal_ids: list[int]) -> np.ndarray:
    """Scores straight from ONNX Runtime, for checking what the service returns."""
    import onnxruntime as ort

    _, folder = ModelStore(store_root).resolve(ref)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.array([internal_ids[-MAX_LEN:]], dtype=np.int64)
    return session.run(["scores"], {"item_ids": ids})[0][0]
