"""A batch is scored in groups of similar length; the answers do not depend on the grouping."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from app.model import MIN_GROUP_ROWS, LoadedModel, Query, bucket_groups
from model_store import ModelStore
from tests.integration.conftest import tiny_store

BUCKETS = [16, 32, 64, 128, 200]


def test_rows_go_to_the_smallest_bucket_that_fits_and_small_groups_ride_up() -> None:
    lengths = [10, 150, 20, 30, 200, 100, 5, 7, 12, 300]
    groups = bucket_groups(lengths, BUCKETS)
    assert sorted(r for _, rows in groups for r in rows) == list(range(len(lengths)))
    for bucket, rows in groups:
        assert all(min(lengths[r], BUCKETS[-1]) <= bucket for r in rows)
        assert len(rows) >= MIN_GROUP_ROWS or bucket == groups[-1][0]
    assert groups[0] == (16, [0, 6, 7, 8])  # four short rows: their own cheap call
    assert [b for b, _ in groups] == sorted(b for b, _ in groups)
    assert bucket_groups([3], BUCKETS) == [(16, [0])]


def test_mixed_lengths_answer_as_if_each_request_ran_alone(tmp_path: Path) -> None:
    model = LoadedModel(ModelStore(tiny_store(tmp_path)), "tiny@1", "onnxruntime", 1, [4, 8, 16])
    rng = np.random.default_rng(0)
    queries = []
    for n in (2, 3, 3, 2, 12, 6, 1, 16, 2, 4, 3):
        ids = rng.integers(1, model.n_items + 1, size=n)
        queries.append(Query(ids[-model.max_len :], ids, 5))  # as the service truncates
    together = model.run_batch(queries)
    alone = [model.run_batch([q])[0] for q in queries]
    for a, b in zip(together, alone, strict=True):
        assert a.items == b.items
        assert np.allclose(a.scores, b.scores, atol=1e-5)
