"""benchmarks/headline.py: mean ± sd over seeds and per-seed retention, from a store."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from model_store import ModelStore
from tests.conftest import REPO_ROOT
from tests.integration.conftest import publish_tiny


def test_headline_table_over_seeds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ModelStore(tmp_path / "models")
    for seed in (0, 1):
        publish_tiny(store, f"x-teacher-s{seed}", seed=seed)  # test NDCG@10 0.2
        publish_tiny(store, f"x-student-s{seed}", seed=seed, hidden=8)  # 0.19
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import headline

    out = tmp_path / "out"
    argv = ["headline.py", "--store", str(store.root), "--seeds", "0", "1",
            "--teacher", "x-teacher", "--student", "x-student", "--out", str(out)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    headline.main()
    summary = json.loads((out / "headline.json").read_text())["summary"]
    assert summary["teacher"]["test_ndcg@10"] == {"mean": 0.2, "sd": 0.0, "n": 2}
    assert summary["student"]["retention"]["mean"] == pytest.approx(0.95)
    assert summary["student INT8"]["models"] == []
    table = (out / "headline.md").read_text()
    assert "| student | 2 |" in table and "95.0% ± 0.0%" in table
    assert "| student INT8 | missing |" in table and "| student INT4 (QAT) | missing |" in table
    assert summary["teacher"]["bytes_share"]["mean"] == 1.0 and "(1/1.0)" in table


def test_loss_quality_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/loss_quality.py: sampled vs full per data set, share of the full NDCG@10."""
    store = ModelStore(tmp_path / "models")
    for seed in (0, 1):
        timing = {"epochs": 10.0, "train_wall_s": 50.0}
        publish_tiny(store, f"yelp-teacher-full-s{seed}", seed=seed, metrics=timing)  # 0.2
        sampled = {**timing, "test_ndcg@10": 0.196 + 0.002 * seed, "train_wall_s": 20.0}
        publish_tiny(store, f"yelp-teacher-sampled-s{seed}", seed=seed, metrics=sampled)
        # ML-1M's full-softmax teachers are the headline ones, without "-full" in the name
        publish_tiny(store, f"ml1m-teacher-s{seed}", seed=seed, metrics=timing)
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import loss_quality

    out = tmp_path / "out"
    argv = ["loss_quality.py", "--store", str(store.root), "--sets", "yelp", "sports", "ml1m",
            "--seeds", "0", "1", "--out", str(out)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    loss_quality.main()
    table = (out / "loss-quality.md").read_text()
    # the share seed by seed (0.98, 0.99), as mean ± sd
    assert (
        "| yelp | sampled | 2 | 0.1970 ± 0.0014 | 0.3000 ± 0.0000 | 2.0 | 98.5% ± 0.7% (2 pairs) |"
        in table
    )
    assert "| yelp | full | 2 | 0.2000 ± 0.0000 | 0.3000 ± 0.0000 | 5.0 | 100% |" in table
    summary = json.loads((out / "loss-quality.json").read_text())
    assert summary["yelp"]["sampled_share_of_full"]["mean"] == pytest.approx(0.985)
    assert summary["ml1m"]["sampled_share_of_full"] is None
    assert "| sports | full | missing |" in table
    assert "| ml1m | full | 2 | 0.2000 ± 0.0000 |" in table
