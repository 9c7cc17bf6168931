"""Fixtures for the reliability tests: a store of tiny models, copied per test when a test
tampers with it, and the serving settings these tests start from."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.settings import Settings
from tests.integration.conftest import tiny_store

TOKEN = "rel-t0ken-9f8e7d6c5b4a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="session")
def rel_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny@1`, `tiny@2` and `tiny-small@1`; read-only for the tests that share it."""
    return tiny_store(tmp_path_factory.mktemp("rel-store"))


@pytest.fixture
def store_copy(rel_store: Path, tmp_path: Path) -> Path:
    """A private copy of the store that a test may tamper with."""
    return Path(shutil.copytree(rel_store, tmp_path / "store"))


def make_settings(store: Path, **kw: object) -> Settings:
    base: dict[str, object] = {
        "store": str(store),
        "variants": {"full": "tiny@1", "small": "tiny-small@1"},
        "weights": {"full": 0.5, "small": 0.5},
        "max_history_len": 50,
        "max_body_bytes": 4096,
        "batch": {"max_batch_size": 8, "max_wait_s": 0.001},
    }
    return Settings(**{**base, **kw})  # type: ignore[arg-type]


def wait_ready(client: TestClient, timeout_s: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        r = client.get("/readyz")
        if r.status_code == 200:
            return r.json()
        if time.monotonic() > deadline:
            raise AssertionError(f"service not ready: {r.text}")
        time.sleep(0.02)
