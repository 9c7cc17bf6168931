"""A two-stage variant served end to end: string item ids in, the exact top k out (history
excluded), ANN next to it, memory in /v1/variants and /metrics."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from model_store import ModelStore
from model_store.item_matrix import quantize_rows
from tests.integration.conftest import wait_ready
from tests.two_stage import mean_user_vectors, publish_two_stage_variant

N_ITEMS, DIM = 2000, 16
ITEM_IDS = [f"SKU-{i:05d}" for i in range(N_ITEMS)]  # internal id i + 1


def catalogue() -> np.ndarray:
    rng = np.random.default_rng(42)
    rows = rng.standard_normal((N_ITEMS + 1, DIM)).astype(np.float32)
    rows[0] = 0
    return rows


@pytest.fixture(scope="module")
def two_stage_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = ModelStore(tmp_path_factory.mktemp("two-stage") / "store")
    table = catalogue()
    publish_two_stage_variant(store, "ts-exact", table, ITEM_IDS, block_rows=300)
    hnsw = {"type": "hnsw", "m": 16, "ef_construction": 64, "ef_search": 64}
    publish_two_stage_variant(store, "ts-ann", table, ITEM_IDS, index=hnsw, block_rows=300)
    return store.root


@pytest.fixture(scope="module")
def client(two_stage_store: Path) -> Iterator[TestClient]:
    settings = Settings(
        store=str(two_stage_store),
        variants={"exact": "ts-exact@latest", "ann": "ts-ann@latest"},
        weights={"exact": 1.0},
        batch={"max_batch_size": 8},
    )
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        yield c


def brute_force(history: list[str], k: int) -> list[str]:
    table = catalogue()
    q, scale = quantize_rows(table)
    internal = [ITEM_IDS.index(h) + 1 for h in history]
    scores = (q.astype(np.float32) * scale[:, None]) @ mean_user_vectors(table, [internal])[0]
    scores[0] = -np.inf
    scores[internal] = -np.inf
    return [ITEM_IDS[i - 1] for i in np.lexsort((np.arange(len(scores)), -scores))[:k]]


def test_exact_variant_answers_the_full_ranking_with_string_ids(client: TestClient) -> None:
    history = ["SKU-00007", "SKU-01234", "SKU-00042", "no-such-item"]
    r = client.post("/v1/recommend", json={"user_id": "u1", "history": history, "k": 10,
                                           "variant": "exact"})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["source"] == "model" and body["unknown_items"] == 1
    items = [i["item_id"] for i in body["items"]]
    assert items == brute_force(history[:3], 10)
    assert not set(items) & set(history)
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True)


def test_ann_variant_excludes_history_and_agrees_with_exact(client: TestClient) -> None:
    rng = np.random.default_rng(0)
    overlap = []
    for _ in range(20):
        history = [ITEM_IDS[i] for i in rng.integers(0, N_ITEMS, size=5)]
        answers = {}
        for variant in ("exact", "ann"):
            r = client.post("/v1/recommend", json={"user_id": "u", "history": history,
                                                   "k": 10, "variant": variant})  # fmt: skip
            assert r.status_code == 200, r.text
            answers[variant] = [i["item_id"] for i in r.json()["items"]]
            assert len(answers[variant]) == 10 and not set(answers[variant]) & set(history)
        overlap.append(len(set(answers["exact"]) & set(answers["ann"])) / 10)
    assert np.mean(overlap) >= 0.9  # recall@10 measured 1.0 here; ANN, so a bound


def test_batch_endpoint_mixes_variants(client: TestClient) -> None:
    requests = [{"user_id": f"u{i}", "history": [ITEM_IDS[i]], "k": 3, "variant": v}
                for i, v in enumerate(["exact", "ann", "exact"])]  # fmt: skip
    r = client.post("/v1/recommend/batch", json={"requests": requests})
    assert r.status_code == 200, r.text
    for request, answer in zip(requests, r.json()["results"], strict=True):
        assert answer["variant"] == request["variant"]
        assert ITEM_IDS[int(request["user_id"][1:])] not in [i["item_id"] for i in answer["items"]]


def test_variants_and_metrics_report_memory(client: TestClient) -> None:
    variants = client.get("/v1/variants").json()["variants"]
    exact, ann = variants["exact"], variants["ann"]
    assert (exact["scorer"], ann["scorer"]) == ("exact", "ann")
    assert exact["ranking"] == "exact-int8" and ann["ranking"] == "ann-hnsw-int8"
    matrix_bytes = 7 * DIM * 300 + 4 * (N_ITEMS + 1)  # 7 blocks of int8 rows + scales
    assert exact["memory"]["item_matrix_bytes"] == matrix_bytes
    assert ann["memory"]["index_bytes"] > 0 and "index_bytes" not in exact["memory"]
    assert exact["memory_bytes"] == sum(exact["memory"].values())
    metrics = client.get("/metrics").text
    for name in ("exact", "ann"):
        line = f'recsys_variant_memory_bytes{{variant="{name}"}} '
        (value,) = [row.removeprefix(line) for row in metrics.splitlines() if row.startswith(line)]
        assert float(value) == variants[name]["memory_bytes"]
