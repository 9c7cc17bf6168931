"""History mapping: original ids -> internal ids, order kept, unknown ids dropped and counted.

Ids are strings; a request's int stands for its decimal string (tests/unit/test_item_ids.py
has the rest of that contract)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from app.model import LoadedModel


def mapping(tmp_path: Path, item_ids: list) -> LoadedModel:
    path = tmp_path / "items.json"
    payload = {
        "format": "recsys-item-mapping/1",
        "item_ids": item_ids,
        "counts": [1] * len(item_ids),
    }
    path.write_text(json.dumps(payload))
    model = LoadedModel.__new__(LoadedModel)
    model.n_items = len(item_ids)
    model._load_items(path)
    return model


@pytest.mark.parametrize(
    "catalogue", [[50, 7, 3000, 12, 2**62], ["50", "7", "3000", "12", str(2**62)]]
)
def test_numeric_catalogue_maps_in_order_and_counts_unknown(
    tmp_path: Path, catalogue: list
) -> None:
    model = mapping(tmp_path, catalogue)  # unsorted on purpose: internal id = position + 1
    history = [3000, 0, 7, 7, 2**63 - 1, 50, 13, 2**62]
    known, unknown = model.map_history(history)
    assert known.dtype == np.int64
    assert known.tolist() == [3, 2, 2, 1, 5]
    assert unknown == 3
    assert model.item_ids == [str(i) for i in catalogue]  # strings, whatever the JSON held
    # the same history as strings maps the same; "007" is not "7"
    known, unknown = model.map_history([str(i) for i in history] + ["007"])
    assert known.tolist() == [3, 2, 2, 1, 5] and unknown == 4
    assert model.map_history([])[1] == 0 and len(model.map_history([])[0]) == 0
    assert model.map_history([1, 2])[0].tolist() == []


def test_non_numeric_catalogue_maps_strings_and_ints(tmp_path: Path) -> None:
    model = mapping(tmp_path, ["a", "b", "3", "B"])
    assert model._dense is None
    known, unknown = model.map_history([3, 4, "b", "B", "A", "3", "03"])
    assert known.tolist() == [3, 2, 4, 3] and unknown == 3


def test_dense_table_and_dict_agree(tmp_path: Path) -> None:
    """Small numeric ids take the dense table; it must map exactly like the dict path."""
    rng = np.random.default_rng(0)
    catalogue = [int(i) for i in rng.choice(5000, size=300, replace=False)]
    model = mapping(tmp_path, catalogue)
    assert model._dense is not None  # the fast path is really taken
    fallback = mapping(tmp_path, [*catalogue[:-1], 2**62])  # too large for a table: dict
    assert fallback._dense is None
    for _ in range(50):
        history = [int(i) for i in rng.integers(0, 6000, size=int(rng.integers(0, 200)))]
        history += [2**63 - 1] if rng.random() < 0.3 else []
        known, unknown = model.map_history(history)
        expected = [catalogue.index(i) + 1 for i in history if i in catalogue]
        assert known.dtype == np.int64 and known.tolist() == expected
        assert unknown == len(history) - len(expected)
        ids, _ = fallback.map_history([i for i in history if i != catalogue[-1]])
        assert ids.tolist() == [i for i in expected if i != len(catalogue)]
