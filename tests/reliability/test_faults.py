"""Faults: an engine that fails one batch, an engine slower than the deadline, artifacts
corrupted or tampered with after publishing (at start and at /admin/reload), and a store
that is missing at start and appears later.

Concurrency runs on the TestClient's own event loop (the one the lifespan and the batchers
live on): `client.portal.call(...)` with httpx.AsyncClient over ASGITransport.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from app.main import create_app
from compression.configs import ModelConfig
from compression.export.exporter import export_onnx
from compression.model.sasrec import SASRec
from model_store import ModelStore
from tests.integration.conftest import MAX_LEN
from tests.reliability.conftest import AUTH, TOKEN, make_settings, wait_ready

POISON = 1039  # an item id whose presence makes the failing engine raise
REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")


def metric(client: TestClient, name: str, **labels: str) -> float:
    """The value of one sample in /metrics (0.0 when the series does not exist yet)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    line = f"{name}{{{want}}} " if labels else f"{name} "
    for row in client.get("/metrics").text.splitlines():
        if row.startswith(line):
            return float(row.rsplit(" ", 1)[1])
    return 0.0


def concurrently(client: TestClient, bodies: list[dict]) -> list[tuple[int, dict, float]]:
    """POST every body to /v1/recommend at once; (status, JSON, seconds) per request."""

    async def one(ac: httpx.AsyncClient, body: dict) -> tuple[int, dict, float]:
        started = time.perf_counter()
        r = await ac.post("/v1/recommend", json=body)
        return r.status_code, r.json(), time.perf_counter() - started

    async def run() -> list[tuple[int, dict, float]]:
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as ac:
            return list(await asyncio.gather(*(one(ac, b) for b in bodies)))

    return client.portal.call(run)  # type: ignore[union-attr]


class FailingEngine:
    """Wraps the real engine; raises for any batch holding POISON; records every batch."""

    def __init__(self, real: Any, poison_internal: int) -> None:
        self.real, self.poison = real, poison_internal
        self.name = real.name
        self.batches: list[list[int]] = []  # the last (most recent) internal id of each row
        self.failed: list[list[int]] = []
        self.lock = threading.Lock()

    def run(self, ids: np.ndarray) -> np.ndarray:
        rows = [int(row[-1]) for row in ids]
        with self.lock:
            self.batches.append(rows)
        if (ids == self.poison).any():
            with self.lock:
                self.failed.append(rows)
            raise RuntimeError("CUDA error: an illegal memory access at 0xdeadbeef")
        return self.real.run(ids)


@pytest.fixture
def client(rel_store: Path) -> Iterator[TestClient]:
    settings = make_settings(
        rel_store,
        admin_token=TOKEN,
        # Batches of at most 4, one computing at a time: 12 requests make >= 3 batches.
        batch={"max_batch_size": 4, "max_wait_s": 0.05, "max_inflight_batches": 1},
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        wait_ready(c)
        yield c


def swap_engine(client: TestClient, variant: str, make: Callable[[Any], Any]) -> tuple[Any, Any]:
    """Replace a variant's engine with `make(real)`; returns (real, replacement)."""
    model = client.app.state.service.variants[variant].model  # type: ignore[attr-defined]
    real = model.engine
    model.engine = make(real)
    return real, model.engine


# -- (a) one failing batch -----------------------------------------------------------------------


def test_a_failing_batch_fails_only_its_own_callers(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    _, engine = swap_engine(client, "full", lambda real: FailingEngine(real, POISON - 999))
    # Each request's last history item is unique, so a batch row names its request.
    items = [1000 + i for i in range(12)]
    bodies = [{"user_id": f"u{i}", "history": [item], "k": 3, "variant": "full"}
              for i, item in enumerate(items)]  # fmt: skip
    bodies[5]["history"] = [POISON, items[5]]  # poisons whichever batch it lands in
    with caplog.at_level(logging.ERROR):
        results = concurrently(client, bodies)

    assert len(engine.failed) == 1 and len(engine.batches) >= 3, engine.batches
    failed_rows = set(engine.failed[0])
    assert items[5] - 999 in failed_rows
    request_ids = []
    for item, (status, body, _) in zip(items, results, strict=True):
        if item - 999 in failed_rows:  # a caller in the failing batch
            assert status == 500, body
            assert body["code"] == "inference_failed" and REQUEST_ID.match(body["request_id"])
            assert body["error"] == "variant 'full': inference failed"
            request_ids.append(body["request_id"])
        else:  # a caller in another batch, computed concurrently
            assert status == 200 and len(body["items"]) == 3, body
    n_failed = len(failed_rows)
    assert len(set(request_ids)) == n_failed and 1 <= n_failed <= 4
    assert sum(s == 200 for s, _, _ in results) == 12 - n_failed
    for body in (b for _, b, _ in results):
        assert "CUDA" not in json.dumps(body) and "0xdeadbeef" not in json.dumps(body)
    # The log keeps what the response hides: every request id, and the engine's own error.
    logged = caplog.text
    assert all(rid in logged for rid in request_ids)
    assert "CUDA error: an illegal memory access" in logged
    assert metric(client, "recsys_requests_total", status="error", variant="full") == n_failed
    assert metric(client, "recsys_requests_total", status="ok", variant="full") == 12 - n_failed

    # The next batches succeed, on the same engine (no poison this time).
    results = concurrently(client, [{**b, "history": [1001]} for b in bodies])
    assert [s for s, _, _ in results] == [200] * 12
    assert len(engine.failed) == 1


def test_the_request_id_is_the_callers_when_safe(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    swap_engine(client, "full", lambda r: FailingEngine(r, poison_internal=POISON - 999))
    body = {"user_id": "u", "history": [POISON], "variant": "full"}
    with caplog.at_level(logging.ERROR):
        r = client.post("/v1/recommend", json=body, headers={"X-Request-ID": "trace42"})
        assert r.status_code == 500 and r.json()["request_id"] == "trace42"
        for unsafe in ("a\nb", "../../x", "x" * 65, "id with spaces", "ünï"):
            r = client.post("/v1/recommend", json=body,
                            headers={"X-Request-ID": unsafe.encode()})  # fmt: skip
            assert r.status_code == 500 and REQUEST_ID.match(r.json()["request_id"]), r.text
    assert "request trace42:" in caplog.text and "../../x" not in caplog.text


# -- (b) an engine slower than the deadline ------------------------------------------------------


def test_a_slow_engine_gets_504_at_the_deadline_and_is_counted(rel_store: Path) -> None:
    deadline_s, engine_s = 0.2, 1.0
    settings = make_settings(
        rel_store,
        request_timeout_s=deadline_s,
        batch={"max_batch_size": 2, "max_wait_s": 0.0, "max_inflight_batches": 1},
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        wait_ready(c)
        release = threading.Event()

        class SlowEngine:
            def __init__(self, real: Any) -> None:
                self.real, self.name = real, real.name

            def run(self, ids: np.ndarray) -> np.ndarray:
                release.wait(engine_s)
                return self.real.run(ids)

        real, _ = swap_engine(c, "full", SlowEngine)
        bodies = [{"user_id": f"s{i}", "history": [1001 + i], "variant": "full"} for i in range(6)]
        results = concurrently(c, bodies)
        for status, body, elapsed in results:
            assert status == 504, body
            assert body["code"] == "deadline" and REQUEST_ID.match(body["request_id"])
            assert body["error"] == f"variant 'full': no result within {deadline_s:.3f} s"
            # At the deadline, not when the engine finally returns.
            assert deadline_s * 0.9 <= elapsed < deadline_s + 0.5, elapsed
        release.set()
        swap_engine(c, "full", lambda _: real)
        assert metric(c, "recsys_requests_total", status="deadline", variant="full") == 6
        assert metric(c, "recsys_rejected_total", reason="deadline", variant="full") == 6
        # Requests that timed out in the queue are dropped before inference, and counted
        # once (they used to be counted again as "cancelled").
        deadline = time.monotonic() + 5
        while metric(c, "recsys_queue_depth", variant="full") > 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = c.post("/v1/recommend", json={"user_id": "s", "history": [1001], "variant": "full"})
        assert r.status_code == 200, r.text
        assert metric(c, "recsys_rejected_total", reason="cancelled", variant="full") == 0
        assert metric(c, "recsys_rejected_total", reason="deadline", variant="full") == 6


# -- (c) corrupt and tampered artifacts ------------------------------------------------------------


def flip_a_byte(folder: Path) -> None:
    path = folder / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(folder: Path) -> None:
    path = folder / "model.onnx"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def unknown_manifest_key(folder: Path) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["trust_me"] = True
    path.write_text(json.dumps(manifest))


def tampered_items(folder: Path) -> None:
    path = folder / "items.json"
    items = json.loads(path.read_text())
    items["item_ids"][0], items["item_ids"][1] = items["item_ids"][1], items["item_ids"][0]
    path.write_text(json.dumps(items))


def planted_file(folder: Path) -> None:
    (folder / "model.pkl").write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")


TAMPERING = {
    "checksum": (flip_a_byte, "artifact 'model.onnx' fails its sha256 check"),
    "truncated": (truncate, "artifact 'model.onnx' has"),
    "unknown_key": (unknown_manifest_key, "unknown key 'trust_me'"),
    "items_json": (tampered_items, "artifact 'items.json' fails its sha256 check"),
    "planted_file": (planted_file, "unexpected file 'model.pkl' not in the manifest"),
}


@pytest.mark.parametrize("kind", sorted(TAMPERING))
def test_a_tampered_version_is_refused_at_start_and_served_once_repaired(
    kind: str, rel_store: Path, store_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tamper, problem = TAMPERING[kind]
    tamper(store_copy / "tiny" / "1")
    settings = make_settings(store_copy, load_retry_s=0.05)
    with caplog.at_level(logging.INFO), TestClient(create_app(settings)) as c:
        deadline = time.monotonic() + 10
        while metric(c, "recsys_model_loads_total", result="failed", variant="full") < 2:
            assert time.monotonic() < deadline, "no failed load counted"
            time.sleep(0.02)
        assert c.get("/healthz").json() == {"status": "alive"}
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["code"] == "not_ready"
        assert "variant 'full': tiny@1: cannot be served" in r.json()["error"]
        assert problem in r.json()["error"]
        r = c.post("/v1/recommend", json={"user_id": "u", "history": [1001]})
        assert r.status_code == 503 and r.json()["code"] == "not_ready"
        assert metric(c, "recsys_model_loads_total", result="ok", variant="full") == 0
        assert metric(c, "recsys_ready") == 0
        errors = [rec for rec in caplog.records if rec.levelno == logging.ERROR]
        assert any(
            rec.getMessage().startswith("variant full: tiny@1: cannot be served")
            and problem in rec.getMessage()
            for rec in errors
        ), [rec.getMessage() for rec in errors]

        # Repaired on disk: the retry loop picks it up without a restart.
        shutil.rmtree(store_copy / "tiny" / "1")
        shutil.copytree(rel_store / "tiny" / "1", store_copy / "tiny" / "1")
        wait_ready(c, timeout_s=10)
        assert metric(c, "recsys_model_loads_total", result="ok", variant="full") == 1
        r = c.post("/v1/recommend", json={"user_id": "u", "history": [1001], "variant": "full"})
        assert r.status_code == 200 and r.json()["model_version"] == "tiny@1"


def publish_like(store: ModelStore, onnx: Path) -> str:
    """A new version of `tiny` that is honestly published (checksums match) around `onnx`."""
    manifest, folder = store.resolve("tiny@1")
    new = store.publish(
        "tiny",
        {"model.onnx": onnx, "items.json": folder / "items.json"},
        kind=manifest.kind,
        parent=None,
        architecture=manifest.architecture,
        recipe=manifest.recipe,
        dataset=manifest.dataset,
        metrics=manifest.metrics,
    )
    return f"tiny@{new.version}"


def garbage_onnx(store: ModelStore, tmp: Path) -> str:
    path = tmp / "model.onnx"
    path.write_bytes(b"\x08\x07" + bytes(range(256)) * 4)
    return publish_like(store, path)


def wrong_catalogue_onnx(store: ModelStore, tmp: Path) -> str:
    """A real model for 30 items published as one for 40: the warm-up must catch it."""
    torch.manual_seed(3)
    cfg = ModelConfig(n_items=30, max_len=MAX_LEN, hidden=16, n_heads=2, n_blocks=1)
    export_onnx(SASRec(cfg).eval(), tmp / "model.onnx")
    return publish_like(store, tmp / "model.onnx")


def tampered_v2(how: Callable[[Path], None]) -> Callable[[ModelStore, Path], str]:
    def make(store: ModelStore, tmp: Path) -> str:
        how(store.root / "tiny" / "2")
        return "tiny@2"

    return make


RELOADS = {
    **{k: (tampered_v2(how), problem) for k, (how, problem) in TAMPERING.items()},
    "garbage_onnx": (garbage_onnx, "ONNX Runtime cannot load it"),
    "wrong_catalogue": (wrong_catalogue_onnx, "engine returned scores (1, 31), expected (1, 41)"),
}


@pytest.mark.parametrize("kind", sorted(RELOADS))
def test_reload_to_a_bad_version_is_409_and_the_old_one_keeps_serving(
    kind: str, store_copy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make, problem = RELOADS[kind]
    with TestClient(create_app(make_settings(store_copy, admin_token=TOKEN))) as c:
        wait_ready(c)
        body = {"user_id": "u", "history": [1001, 1002], "variant": "full"}
        before = c.post("/v1/recommend", json=body).json()
        ref = make(ModelStore(store_copy), tmp_path)
        with caplog.at_level(logging.ERROR):
            r = c.post("/admin/reload", json={"variant": "full", "model": ref}, headers=AUTH)
        assert r.status_code == 409, r.text
        error = r.json()["error"]
        assert r.json()["code"] == "reload_failed"
        assert problem in error and "variant 'full' keeps serving its old version" in error
        assert f"variant full: reload to {ref} refused, old version kept" in caplog.text
        assert problem in caplog.text
        after = c.post("/v1/recommend", json=body).json()
        assert after["model_version"] == "tiny@1" and after["items"] == before["items"]
        assert metric(c, "recsys_model_loads_total", result="failed", variant="full") == 1
        info = dict(engine="onnxruntime-cpu", model="tiny", precision="fp32", variant="full")
        assert metric(c, "recsys_model_info", **info, version="1") == 1
        assert c.get("/v1/variants").json()["variants"]["full"]["version"] == 1
        assert c.get("/readyz").status_code == 200


# -- (d) a store that is not there at start --------------------------------------------------------


@pytest.mark.parametrize("kind", ["missing", "not_a_directory"])
def test_a_store_that_appears_later_is_picked_up(
    kind: str, rel_store: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "store"
    if kind == "not_a_directory":
        root.write_text("not a store")
    settings = make_settings(root, load_retry_s=0.05)
    with caplog.at_level(logging.ERROR), TestClient(create_app(settings)) as c:
        deadline = time.monotonic() + 10
        while metric(c, "recsys_model_loads_total", result="failed", variant="full") < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503
        reason = r.json()["error"]
        assert "variant 'full'" in reason and "variant 'small'" in reason
        what = "is not a directory" if kind == "not_a_directory" else "does not exist"
        assert f"model store {root} {what}" in reason
        assert f"variant full: tiny@1: cannot be served: model store {root} {what}" in caplog.text
        assert metric(c, "recsys_ready") == 0

        if kind == "not_a_directory":
            root.unlink()
        shutil.copytree(rel_store, root)
        wait_ready(c, timeout_s=10)
        assert metric(c, "recsys_ready") == 1
        for variant in ("full", "small"):
            assert metric(c, "recsys_model_loads_total", result="ok", variant=variant) == 1
        r = c.post("/v1/recommend", json={"user_id": "u", "history": [1001]})
        assert r.status_code == 200, r.text
