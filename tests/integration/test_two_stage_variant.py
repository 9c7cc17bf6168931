"""A trained model published as a two-stage variant (user vector + int8 item matrix + FAISS
index), evaluated offline like every model and served with the same answers as its parent."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from compression.configs import TeacherRecipe
from compression.pipeline import train_teacher
from compression.two_stage import two_stage_variant
from model_store.store import ModelStore
from tests.integration.conftest import wait_ready

DATA = "synthetic:users=400,items=300,max_len=16,min_len=6,seed=3"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    s = ModelStore(tmp_path_factory.mktemp("two-stage"))
    recipe = TeacherRecipe(
        name="t", data={"path": DATA}, model={"hidden": 32, "max_len": 16, "n_heads": 2},
        train={"max_epochs": 4, "lr": 5e-3, "threads": 1},
    )  # fmt: skip
    train_teacher(recipe, s, progress=False, log=lambda _: None)
    return s


def test_exact_int8_keeps_the_parents_quality(store: ModelStore) -> None:
    m = two_stage_variant(store, "t@1", precision="int8", log=lambda _: None)
    parent, _ = store.resolve("t@1")
    assert m.scorer is not None and m.scorer.kind == "exact" and m.scorer.precision == "int8"
    assert m.parent == "t@1" and m.kind == "two-stage-int8"
    assert m.metrics["parity_max_abs_diff"] < 1e-3
    assert m.metrics["test_ndcg@10"] == pytest.approx(parent.metrics["test_ndcg@10"], rel=0.03)


def test_an_index_is_measured_before_it_is_published(store: ModelStore) -> None:
    index = {"type": "hnsw", "m": 16, "ef_construction": 100, "ef_search": 64}
    m = two_stage_variant(store, "t@1", precision="fp32", index=index, log=lambda _: None)
    assert m.scorer is not None and m.scorer.kind == "ann"
    assert m.metrics["index_recall@10"] >= 0.9  # 300 items: HNSW finds nearly all
    assert m.metrics["index_build_s"] >= 0.0


def test_served_two_stage_answers_match_the_full_model(store: ModelStore) -> None:
    exact = two_stage_variant(store, "t@1", precision="fp32", name="t-exact", log=lambda _: None)
    settings = Settings(
        store=str(store.root),
        variants={"full": "t@1", "two": f"t-exact@{exact.version}"},
        reference_variant="full",
    )  # type: ignore[arg-type]
    history = ["i3", "i17", "i42", "i8"]
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        answers = {
            v: client.post(
                "/v1/recommend", json={"user_id": "u", "history": history, "k": 10, "variant": v}
            ).json()
            for v in ("full", "two")
        }
    assert all("items" in a for a in answers.values()), answers
    ids = {v: [i["item_id"] for i in a["items"]] for v, a in answers.items()}
    assert ids["two"] == ids["full"] and not set(ids["two"]) & set(history)
    scores = [np.array([i["score"] for i in a["items"]]) for a in answers.values()]
    np.testing.assert_allclose(scores[0], scores[1], rtol=1e-4, atol=1e-4)
