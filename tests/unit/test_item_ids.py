"""Item ids are strings end to end: data file -> items.json -> request -> response.

A request may name an id by its string or by a JSON integer (its decimal string, 7 -> "7");
a response spells every id exactly as the catalogue does. A catalogue whose ids collide
("007" and "7", NFKC, surrounding whitespace) is refused when loaded, when published and when
served. Synthetic data is made here; the round trip trains a real tiny model.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.main import create_app
from app.model import DENSE_IDS, LoadedModel, ModelLoadError
from app.schemas import RecommendRequest
from app.settings import Settings
from compression.configs import ModelConfig
from compression.data.events import load_event_file
from compression.data.sequences import (
    DataError,
    SequenceDataset,
    leave_one_out,
    load_sequence_file,
    write_item_mapping,
)
from compression.export.exporter import export_onnx
from compression.model.sasrec import SASRec
from compression.pipeline import dataset_info, signature
from model_store import DatasetInfo, ModelStore
from model_store.item_ids import ItemIdError, check_item_ids, is_canonical_decimal, item_id_key
from tests.conftest import quick_train
from tests.integration.conftest import wait_ready
from tests.unit.test_item_mapping import mapping

# A shop's catalogue: leading zeros, ASINs/SKUs, case-distinct SKUs, plain numbers.
CATALOGUE = [
    "0042", "007", "0", "12", "B00ABC12", "b00abc12", "SKU-9", "x y", "ÄÖ-1", "9000",
    *(f"A{i:03d}" for i in range(14)),
]  # fmt: skip


# -- the rule --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "why"),
    [
        ("7", "7", "the same id twice"),
        ("007", "7", "dropping leading zeros"),
        ("0", "000", "dropping leading zeros"),
        ("\uff21\uff11", "A1", "Unicode NFKC"),  # fullwidth "A1"
        ("\uff2200", "B00", "Unicode NFKC"),  # fullwidth "B"
        (" x", "x", "surrounding whitespace"),
        ("x\u00a0", "x", "Unicode NFKC normalisation and stripping surrounding whitespace"),
        ("\uff10\uff107", "7", "Unicode NFKC normalisation and dropping leading zeros"),
    ],
)
def test_colliding_ids_are_refused_naming_both(a: str, b: str, why: str) -> None:
    assert item_id_key(a) == item_id_key(b)
    with pytest.raises(ItemIdError) as err:
        check_item_ids(["other", a, b], "items.json", "fix it")
    message = str(err.value)
    assert f"item ids {a!r} and {b!r} collide" in message and why in message
    assert message.startswith("items.json: ") and message.endswith("; fix it")
    assert "\n" not in message


def test_distinct_ids_pass_and_stay_strings() -> None:
    ids = ["007", "b1", "B1", "08", "x", "x1", "1 2", "0", 5, np.int64(6)]
    assert check_item_ids(ids, "w", "f") == ["007", "b1", "B1", "08", "x", "x1", "1 2", "0", "5",
                                             "6"]  # fmt: skip
    for bad in (True, 1.0, None, -1, "", "x" * 257, ["7"]):
        with pytest.raises(ItemIdError, match="w: item id"):
            check_item_ids(["a", bad], "w", "f")
    assert is_canonical_decimal("0") and is_canonical_decimal("3952")
    assert not any(map(is_canonical_decimal, ["007", "00", "", "7a", "\u0667", "+7", " 7"]))


def test_colliding_catalogue_is_refused_at_publish_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "items.json"
    with pytest.raises(DataError, match=r"item ids '007' and '7' collide.*rename") as err:
        write_item_mapping(path, ["1", "007", "2", "7"], [1, 1, 1, 1])
    assert "\n" not in str(err.value)
    assert not path.exists()
    write_item_mapping(path, ["007", "B00ABC12", "b00abc12"], [3, 2, 1])  # alone: fine
    assert json.loads(path.read_text())["item_ids"] == ["007", "B00ABC12", "b00abc12"]


def test_colliding_catalogue_is_refused_at_load_before_training(tmp_path: Path) -> None:
    events = tmp_path / "events.csv"
    events.write_text("u,i,t\na,007,1\na,x,2\nb,7,3\n")
    with pytest.raises(DataError, match=r"events\.csv: item ids '007' and '7' collide"):
        load_event_file(events, user_col="u", item_col="i", time_col="t")
    seqs = tmp_path / "seqs.txt"
    seqs.write_text("1 007 2\n2 3 7\n")
    with pytest.raises(DataError, match=r"seqs\.txt: item ids '007' and '7' collide"):
        load_sequence_file(seqs)


def test_sequence_files_keep_ids_as_spelled(tmp_path: Path) -> None:
    seqs = tmp_path / "seqs.txt"
    seqs.write_text("1 007 2 0042\n2 2 007\n")
    assert load_sequence_file(seqs).item_ids == ["2", "007", "0042"]  # numeric order


# -- requests --------------------------------------------------------------------------------


def parse(history: object) -> list[int | str]:
    body = json.dumps({"user_id": "u", "history": history})
    return RecommendRequest.model_validate_json(body).history


def test_requests_take_strings_and_integers_but_nothing_else() -> None:
    assert parse(["007", 7, "B00ABC12", 0, "x" * 256]) == ["007", 7, "B00ABC12", 0, "x" * 256]
    for bad, message in [
        (1.5, "Input should be a valid integer"),
        (7.5, "Input should be a valid integer"),
        (True, "Input should be a valid integer"),
        (None, "Input should be a valid integer"),
        (-1, "greater than or equal to 0"),
        (2**63, "less than or equal to 9223372036854775807"),
        ("", "at least 1 character"),
        ("x" * 257, "at most 256 characters"),
    ]:
        with pytest.raises(ValidationError) as err:
            parse(["ok", bad])
        errors = err.value.errors()
        assert len(errors) == 1, errors  # one error per item, not one per union member
        assert errors[0]["loc"] == ("history", 1) and message in errors[0]["msg"]
    schema = RecommendRequest.model_json_schema()["properties"]["history"]["items"]
    assert {s["type"] for s in schema["anyOf"]} == {"string", "integer"}


# -- the service's mapping -------------------------------------------------------------------


loaded = mapping  # the service's id mapping alone, from an items.json (test_item_mapping)


def test_ints_are_their_decimal_strings_and_strings_match_exactly(tmp_path: Path) -> None:
    model = loaded(tmp_path, ["007", "7x", "B1", "b1", "12"])
    assert model._dense is None  # "007" is not a canonical decimal: no dense table
    known, unknown = model.map_history(["007", 7, "7", "b1", "B1", 12, "12", "012", " B1"])
    assert known.tolist() == [1, 4, 3, 5, 5] and unknown == 4
    assert model.popular_top_k(2, None).items == ["007", "7x"]  # catalogue spelling


def test_dense_table_serves_numeric_catalogues(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    ids = [str(i) for i in rng.choice(3953, size=300, replace=False)]
    model = loaded(tmp_path, ids)
    assert model._dense is not None and len(model._dense) == max(map(int, ids)) + 1
    history = [int(ids[5]), int(ids[0]), 99999, int(ids[5])]
    known, unknown = model.map_history(history)
    assert known.tolist() == [6, 1, 6] and unknown == 1
    # strings and mixed histories map the same (through the dict)
    assert model.map_history([str(h) for h in history])[0].tolist() == [6, 1, 6]
    assert model.map_history([history[0], ids[0], "0" + ids[0]])[0].tolist() == [6, 1]
    assert loaded(tmp_path, ["0", "1", str(DENSE_IDS)])._dense is None  # too large a table
    assert loaded(tmp_path, ["0", "1", "2"])._dense is not None  # "0" is canonical


def test_hand_edited_colliding_mapping_is_refused_by_the_service(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"item ids '007' and '7' collide"):
        loaded(tmp_path, ["1", "007", "7"])
    with pytest.raises(ModelLoadError, match=r"item ids '7' and '7' collide"):
        loaded(tmp_path, [7, "7"])  # a JSON integer reads as its decimal string
    with pytest.raises(ModelLoadError, match=r"item id 1.5 at position 1 is not a string"):
        loaded(tmp_path, ["1", 1.5])
    # through the store: a mapping published by hand, bypassing compression's check
    store = ModelStore(tmp_path / "store")
    _publish_by_hand(store, "hand", ["07", "x", "7"], tmp_path / "build")
    with pytest.raises(ModelLoadError, match=r"hand/1/items\.json: item ids '07' and '7' collide"):
        LoadedModel(store, "hand@1", "onnxruntime", 1, [8])


# -- round trip: CSV of shop ids -> training -> store -> HTTP --------------------------------


def _cfg(n_items: int) -> ModelConfig:
    return ModelConfig(n_items=n_items, max_len=8, hidden=8, n_heads=2, n_blocks=1)


def _publish(
    store: ModelStore, name: str, model: SASRec, build: Path, dataset: DatasetInfo | dict
) -> None:
    """Publish `model` with the `items.json` already in `build`."""
    export_onnx(model.eval(), build / "model.onnx")
    store.publish(
        name,
        {"model.onnx": build / "model.onnx", "items.json": build / "items.json"},
        kind="teacher",
        parent=None,
        architecture=model.cfg.model_dump(),
        recipe={},
        dataset=dataset,
        metrics={"test_ndcg@10": 0.1, "test_hr@10": 0.2},
        signature=signature(model.cfg.n_items),
    )


def _publish_by_hand(store: ModelStore, name: str, item_ids: list[str], build: Path) -> None:
    """A mapping written by hand, bypassing compression's checks."""
    build.mkdir(parents=True)
    mapping = {"format": "recsys-item-mapping/1", "n_items": len(item_ids), "item_ids": item_ids}
    (build / "items.json").write_text(json.dumps(mapping))
    n = len(item_ids)
    info = {"name": "hand", "sha256": "0" * 64, "n_users": 1, "n_items": n, "n_interactions": 1}
    _publish(store, name, SASRec(_cfg(n)), build, info)


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SequenceDataset]:
    root = tmp_path_factory.mktemp("shop")
    rng = random.Random(0)
    rows = ["customer,sku,ts"]
    for user in range(40):
        for t, item in enumerate(rng.sample(CATALOGUE, 8)):
            rows.append(f"c{user},{item},{1000 + t}")
    (root / "events.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    data = load_event_file(root / "events.csv", user_col="customer", item_col="sku", time_col="ts")
    assert sorted(data.item_ids) == sorted(CATALOGUE)  # loaded as spelled
    split = leave_one_out(data)
    torch.manual_seed(0)
    model = quick_train(_cfg(data.n_items), split, epochs=1)
    (root / "build").mkdir()
    data.save_item_mapping(root / "build" / "items.json", split.item_counts())  # checks the ids
    _publish(ModelStore(root / "store"), "shop", model, root / "build", dataset_info(data))
    return root / "store", data


@pytest.fixture(scope="module")
def shop_client(shop: tuple[Path, SequenceDataset]) -> Iterator[TestClient]:
    batch = {"max_batch_size": 4, "max_wait_s": 0.0}
    settings = Settings(store=str(shop[0]), variants={"m": "shop@1"}, batch=batch)  # type: ignore[arg-type]
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        yield client


def ask(client: TestClient, **body: object) -> dict:
    r = client.post("/v1/recommend", json={"user_id": "u", **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_store_holds_the_shops_ids_as_spelled(shop: tuple[Path, SequenceDataset]) -> None:
    mapping = json.loads((shop[0] / "shop" / "1" / "items.json").read_text())
    assert mapping["item_ids"] == shop[1].item_ids and "0042" in mapping["item_ids"]
    assert all(isinstance(i, str) for i in mapping["item_ids"])


def test_string_history_is_answered_in_the_catalogues_spelling(shop_client: TestClient) -> None:
    got = ask(shop_client, history=["0042", "B00ABC12", "ÄÖ-1"], k=5)
    assert got["source"] == "model" and got["unknown_items"] == 0
    ids = [i["item_id"] for i in got["items"]]
    assert len(ids) == 5 and set(ids) <= set(CATALOGUE) - {"0042", "B00ABC12", "ÄÖ-1"}
    every = ask(shop_client, history=["007"], k=len(CATALOGUE), exclude_history=False)
    assert sorted(i["item_id"] for i in every["items"]) == sorted(CATALOGUE)  # "0042", "007"


def test_integers_unknown_strings_and_fallback(shop_client: TestClient) -> None:
    # 12 is "12" (known); 42 is "42", not "0042"; 7 is not "007"; case and spaces matter
    got = ask(shop_client, history=[12, 42, 7, "b00ABC12", " 0042", "nope", "0"], k=3)
    assert got["unknown_items"] == 5 and got["source"] == "model"
    assert ask(shop_client, history=[12, "0"], k=3)["items"] == got["items"]
    fallback = ask(shop_client, history=["0042 ", 42], k=3)
    assert fallback["source"] == "popular" and fallback["unknown_items"] == 2
    assert all(i["item_id"] in CATALOGUE for i in fallback["items"])
    r = shop_client.post("/v1/recommend/batch", json={"requests": [
        {"user_id": "a", "history": ["007", 12]}, {"user_id": "b", "history": [""]}]})  # fmt: skip
    assert (
        r.status_code == 422
        and "requests.1.history.0: String should have at least 1" in (r.json()["error"])
    )
