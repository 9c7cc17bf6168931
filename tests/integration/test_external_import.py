"""An ONNX model from elsewhere, with string item ids, imported into the store: evaluated,
served, and compressed (INT8, FP16) by the same steps as the project's own graphs."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from compression.configs import DataSpec
from compression.external import import_external
from compression.quantize.int8 import QuantizeConfig
from compression.variants import fp16_variant, int4_variant, quantize_variant
from model_store.store import ModelStore
from tests.integration.conftest import wait_ready
from tests.unit.test_external_teacher import Bidirectional

N_TEACHER = 30


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelStore, Path]:
    root = tmp_path_factory.mktemp("import")
    rng = np.random.default_rng(0)
    # A shop's event log with its own ids; two of its items the teacher never saw.
    shop = [f"B00{i:03d}" for i in range(N_TEACHER)] + ["NEW-A", "NEW-B"]
    events = root / "events.csv"
    with events.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "ts"])
        for u in range(120):
            for t, item in enumerate(rng.choice(shop, size=8, replace=False)):
                w.writerow([f"u{u}", item, t])
    items = root / "teacher-items.txt"
    items.write_text("\n".join(shop[:N_TEACHER][::-1]) + "\n")  # its own id order
    torch.manual_seed(0)
    model = Bidirectional(N_TEACHER).eval()
    path = root / "teacher.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.randint(1, N_TEACHER + 1, (2, 5)),), str(path),
            input_names=["history"], output_names=["logits"], opset_version=17, dynamo=False,
            dynamic_axes={"history": {0: "b", 1: "n"}, "logits": {0: "b"}},
        )  # fmt: skip
    store = ModelStore(root / "models")
    spec = DataSpec(path=str(events), user_col="user_id", item_col="item_id", time_col="ts")
    import_external(store, path, items, spec, "ext", context=6, log=lambda _: None)
    return store, path


def test_an_imported_teacher_is_a_stored_model(imported) -> None:
    store, _ = imported
    m, _ = store.load("ext@1")
    assert m.recipe["external_teacher"]["unknown_items"] == 2
    assert len(m.recipe["external_teacher"]["sha256"]) == 64
    assert m.architecture["max_len"] == 6 and m.signature.outputs[0].shape[1] == N_TEACHER + 3
    assert 0.0 <= m.metrics["test_ndcg@10"] <= 1.0 and m.metrics["params"] > 0


def test_it_is_served_in_the_shops_ids_ranking_unknown_items_last(imported) -> None:
    store, _ = imported
    settings = Settings(store=str(store.root), variants={"ext": "ext@1"})  # type: ignore[arg-type]
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        answer = client.post(
            "/v1/recommend", json={"user_id": "u", "history": ["B00003", "NEW-A"], "k": 40}
        ).json()
    got = [i["item_id"] for i in answer["items"]]
    # All 29 known items but the history's, then the one unknown item left.
    assert len(got) == N_TEACHER and got[-1] == "NEW-B" and "B00003" not in got
    assert all(i.startswith("B00") for i in got[:-1])


def test_int8_and_fp16_of_the_imported_graph(imported) -> None:
    store, _ = imported
    q = quantize_variant(store, "ext@1", QuantizeConfig(mode="dynamic"), log=lambda _: None)
    assert q.parent == "ext@1" and q.artifacts["model.onnx"].precision == "int8"
    assert q.metrics["top10_agreement_vs_parent"] > 0.8
    half = fp16_variant(store, "ext@1", log=lambda _: None)
    assert half.metrics["top10_agreement_vs_parent"] > 0.95


def test_int4_of_the_imported_graph_is_evaluated_and_served(imported) -> None:
    """The int4 pass on a graph the project did not write: its MatMuls become MatMulNBits
    (opset raised to 21 inside the wrapper), and the service loads and ranks with it."""
    store, _ = imported
    q = int4_variant(store, "ext@1", 16, log=lambda _: None)
    assert q.parent == "ext@1" and q.artifacts["model.onnx"].precision == "int4"
    assert q.recipe["int4_matmuls"] >= 1 and q.metrics["top10_agreement_vs_parent"] > 0.5
    settings = Settings(store=str(store.root), variants={"ext4": f"{q.name}@{q.version}"})  # type: ignore[arg-type]
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        answer = client.post(
            "/v1/recommend", json={"user_id": "u", "history": ["B00003"], "k": 5}
        ).json()
        listed = client.get("/v1/variants").json()
    got = [i["item_id"] for i in answer["items"]]
    assert len(got) == 5 and "B00003" not in got
    # Folded to float32 when loaded: memory counts the weights as they are held.
    variant = listed["variants"]["ext4"]
    assert variant["memory"]["model_bytes"] >= 4 * q.metrics["params"] > q.metrics["model_bytes"]


def test_a_build_recipe_with_an_external_teacher(imported, tmp_path: Path) -> None:
    from compression.build import load_build_recipe, run_build

    _, path = imported
    root = path.parent
    recipe_file = tmp_path / "ext.toml"
    recipe_file.write_text(f"""
family = "shop"
[data]
path = "{root / "events.csv"}"
user_col = "user_id"
item_col = "item_id"
time_col = "ts"
[external_teacher]
onnx = "{path}"
items = "{root / "teacher-items.txt"}"
context = 6
[[students]]
name = "shop-student"
model = {{ hidden = 16, max_len = 6, n_blocks = 1 }}
train = {{ max_epochs = 2, lr = 0.005, threads = 1 }}
distill = {{ alpha = 1.0, temperature = 1.0, top_k = 8 }}
[[quantize]]
source = "shop-teacher"
config = {{ mode = "dynamic" }}
""")
    recipe = load_build_recipe(recipe_file)
    store = ModelStore(tmp_path / "models")
    built = run_build(recipe, store, progress=False, log=lambda _: None)
    assert set(built) == {"shop-teacher", "shop-student", "shop-teacher-int8-dynamic"}
    assert (
        built["shop-student"].recipe["external_teacher"]["sha256"]
        == (built["shop-teacher"].recipe["external_teacher"]["sha256"])
    )
    logs: list[str] = []
    again = run_build(recipe, store, progress=False, log=logs.append)
    assert {n: m.version for n, m in again.items()} == {n: m.version for n, m in built.items()}
    assert sum("reusing" in line for line in logs) == 3


def test_a_build_has_one_teacher(tmp_path: Path) -> None:
    from compression.build import load_build_recipe

    recipe_file = tmp_path / "two.toml"
    recipe_file.write_text('family = "x"\n[teacher]\n[external_teacher]\nonnx = "a"\nitems = "b"\n')
    with pytest.raises(ValueError, match=r"\[teacher\] and \[external_teacher\] both set"):
        load_build_recipe(recipe_file)


def test_a_graph_already_using_our_names_is_wrapped(tmp_path: Path) -> None:
    """The project's own exports call their input item_ids and output scores."""
    from compression.configs import ModelConfig
    from compression.export.exporter import export_onnx
    from compression.model.sasrec import SASRec

    torch.manual_seed(0)
    ours = tmp_path / "ours.onnx"
    export_onnx(SASRec(ModelConfig(n_items=N_TEACHER, max_len=6, hidden=8)).eval(), ours)
    items = tmp_path / "items.txt"
    items.write_text("\n".join(f"B00{i:03d}" for i in range(N_TEACHER)) + "\n")
    events = tmp_path / "events.csv"
    events.write_text("user_id,item_id,ts\n" + "".join(
        f"u{u},B00{(u + t) % N_TEACHER:03d},{t}\n" for u in range(20) for t in range(6)
    ))  # fmt: skip
    spec = DataSpec(path=str(events), user_col="user_id", item_col="item_id", time_col="ts")
    store = ModelStore(tmp_path / "models")
    m = import_external(store, ours, items, spec, "ours", context=6, log=lambda _: None)
    assert m.recipe["external_teacher"]["unknown_items"] == 0
