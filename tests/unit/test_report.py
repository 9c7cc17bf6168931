"""`compression.report.compare`: family discovery, measured agreement, retention, Pareto marking,
the three output files, and the `recsys compare` CLI (tiny models, a handful of timed runs)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch

from compression.configs import ModelConfig, TeacherRecipe
from compression.export.exporter import export_onnx
from compression.model.sasrec import SASRec
from compression.pipeline import train_teacher
from compression.quantize.int8 import QuantizeConfig
from compression.report.compare import (
    MAX_LABELLED_POINTS,
    Latency,
    Report,
    VariantResult,
    chart_labels,
    compare_family,
    fastest_keeping,
    find_family,
    mark_pareto,
    measure_latency,
    ndcg_retention,
    pareto_front,
    write_report,
)
from compression.variants import quantize_variant
from model_store.store import ModelStore
from tests.integration.test_cli import run

DATA = "synthetic:users=200,items=50,max_len=12,min_len=5,seed=1"


def _publish_student(store: ModelStore, teacher_ref: str, seed: int) -> str:
    """A random smaller student (shorter context, hidden 8, one block) with made-up metrics."""
    teacher, folder = store.load(teacher_ref)
    torch.manual_seed(seed)
    cfg = ModelConfig(n_items=teacher.dataset.n_items, max_len=8, hidden=8, n_blocks=1)
    model = SASRec(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        export_onnx(model, onnx_path)
        m = store.publish(
            "t-student",
            {"model.onnx": onnx_path, "items.json": folder / "items.json"},
            kind="student",
            parent=teacher_ref,
            architecture=cfg.model_dump(),
            recipe={"data": teacher.recipe["data"]},
            dataset=teacher.dataset,
            metrics={
                "test_ndcg@10": 0.05 + seed / 100,
                "test_hr@10": 0.1,
                "params": float(model.num_parameters()),
            },
        )
    return f"{m.name}@{m.version}"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    store = ModelStore(tmp_path_factory.mktemp("store"))
    recipe = TeacherRecipe(
        name="t", data={"path": DATA},
        model={"hidden": 16, "max_len": 12, "n_blocks": 1, "n_heads": 1},
        train={"max_epochs": 1, "threads": 1},
    )  # fmt: skip
    train_teacher(recipe, store, progress=False, log=lambda _: None)
    _publish_student(store, "t@1", seed=0)  # t-student@1: older, left out
    student = _publish_student(store, "t@1", seed=1)  # t-student@2
    quantize_variant(store, student, QuantizeConfig(mode="dynamic"), adaptive_users=None,
                     log=lambda _: None)  # fmt: skip
    # An unrelated teacher (same files, no parent) with a variant of its own.
    m, folder = store.load("t@1")
    files = {f: folder / f for f in m.artifacts}
    store.publish("other", files, kind="teacher", parent=None, architecture=m.architecture,
                  recipe=m.recipe, dataset=m.dataset, metrics=m.metrics)  # fmt: skip
    store.publish("other-copy", files, kind="quantized", parent="other@1",
                  architecture=m.architecture, recipe=m.recipe, dataset=m.dataset,
                  metrics=m.metrics)  # fmt: skip
    return store


def test_family_follows_the_parent_chain_and_keeps_the_latest_version(store: ModelStore) -> None:
    teacher, members, skipped = find_family(store, "t")
    assert f"{teacher.name}@{teacher.version}" == "t@1"
    refs = [f"{m.name}@{m.version}" for m in members]
    # int8's parent is the student, the student's is the teacher: both reached; "other*" not.
    assert refs == ["t-student@2", "t-student-int8-dynamic@1"]
    assert skipped == [{"ref": "t-student@1", "reason": "older than t-student@2"}]
    _, all_members, _ = find_family(store, "t@latest", all_versions=True)
    assert len(all_members) == 3


def test_compare_family_measures_agreement_latency_and_retention(store: ModelStore) -> None:
    report = compare_family(store, "t@1", batch_sizes=(1, 4), threads=1,
                            repeats={1: 5, 4: 3}, n_histories=32, warmup=1)  # fmt: skip
    teacher, student, int8 = report.variants
    assert teacher.is_teacher and teacher.ref == "t@1" and int8.precision == "int8"
    assert teacher.top10_agreement == 1.0
    assert 0.0 <= int8.top10_agreement <= 1.0 and 0.0 <= student.top10_agreement <= 1.0
    m_t, _ = store.resolve("t@1")
    assert student.ndcg_retention == pytest.approx(0.06 / m_t.metrics["test_ndcg@10"])
    assert student.max_len == 8 and teacher.max_len == 12 and student.params < teacher.params
    assert report.repeats == {1: 5, 4: 3} and report.agreement_histories == 32
    for v in report.variants:
        assert set(v.latency) == {1, 4} and v.latency[1].runs == 5
        assert 0 < v.latency[4].p50_ms <= v.latency[4].p99_ms
    assert teacher.speedup == {1: 1.0, 4: 1.0}
    assert any(v.on_pareto_front for v in report.variants)
    assert report.dataset["n_items"] == m_t.dataset.n_items


class _CacheSession:
    """A fake ORT session whose call takes 3 ms right after another session's call (its
    weights left the cache) and 1 ms after its own."""

    def __init__(self, last: list[object]) -> None:
        self.calls, self.last = 0, last

    def run(self, _outputs: object, _feed: object) -> None:
        import time

        self.calls += 1
        time.sleep(0.001 if self.last[0] is self else 0.003)
        self.last[0] = self


@pytest.mark.parametrize(("visit_runs", "expect_ms"), [(1, 3.0), (4, 1.0)])
def test_latency_visits_time_warm_calls_and_keep_counts_equal(visit_runs, expect_ms) -> None:
    last: list[object] = [None]  # the session that ran last, shared like a CPU cache
    sessions = [_CacheSession(last), _CacheSession(last)]
    histories = [torch.arange(1, 6).numpy() for _ in range(4)]
    reps = 7  # not a multiple of the 3 timed calls per visit: the last visit is shorter
    lat = measure_latency(sessions, [8, 8], histories, [1], {1: reps}, warmup=0,
                          visit_runs=visit_runs)  # fmt: skip
    for session, result in zip(sessions, lat, strict=True):
        assert result[1].runs == reps
        assert result[1].p50_ms == pytest.approx(expect_ms, abs=0.9)
        # one untimed call opens each visit when visits are longer than one call
        visits = -(-reps // (visit_runs - 1)) if visit_runs > 1 else 0
        assert session.calls == reps + visits
    with pytest.raises(ValueError, match="visit_runs"):
        measure_latency(sessions, [8, 8], histories, [1], {1: 1}, visit_runs=0)


def test_retention_math() -> None:
    assert ndcg_retention(0.0485, 0.05) == pytest.approx(0.97)
    assert ndcg_retention(None, 0.05) is None and ndcg_retention(0.04, 0.0) is None


def test_pareto_front_on_crafted_points() -> None:
    # (latency ms, NDCG): C dominates D (faster and better); A/B/C trade off; E ties C exactly.
    lat = [10.0, 1.0, 2.0, 3.0, 2.0]
    ndcg = [0.30, 0.20, 0.25, 0.24, 0.25]
    assert pareto_front(lat, ndcg) == [True, True, True, False, True]
    assert pareto_front([1.0, 1.0], [0.2, 0.3]) == [False, True]  # same speed, worse
    with pytest.raises(ValueError):
        pareto_front([1.0], [])


def _variant(ref: str, p50: dict[int, float], ndcg: float, teacher: bool = False) -> VariantResult:
    return VariantResult(
        ref=ref, kind="teacher" if teacher else "quantized", parent=None, is_teacher=teacher,
        precision="fp32", max_len=12, params=1000.0, onnx_bytes=4096, test_hr10=0.2,
        test_ndcg10=ndcg, ndcg_retention=ndcg / 0.30, top10_agreement=1.0 if teacher else 0.9,
        latency={b: Latency(runs=3, p50_ms=t, p99_ms=2 * t, mean_ms=t, min_ms=t)
                 for b, t in p50.items()},
    )  # fmt: skip


def _crafted_report() -> Report:
    variants = [
        _variant("t@1", {1: 10.0, 64: 100.0}, 0.300, teacher=True),
        _variant("fast@1", {1: 0.5, 64: 5.0}, 0.280),  # 93%: fast but below the bar
        _variant("good@1", {1: 0.9, 64: 9.0}, 0.295),  # 98%: 11.1x at both
        _variant("slow@1", {1: 2.0, 64: 20.0}, 0.290),  # dominated by good@1
    ]
    for v in variants:
        v.speedup = {b: variants[0].latency[b].p50_ms / v.latency[b].p50_ms for b in (1, 64)}
    mark_pareto(variants)
    for v in variants:
        v.on_pareto_front = v.pareto[1]
    return Report(
        family="t@1", dataset={"name": "tiny", "n_users": 200, "n_items": 50, "sha256": "0"},
        threads=2, batch_sizes=[1, 64], repeats={1: 3, 64: 3}, agreement_histories=8,
        latency_histories=8, created_at="2026-01-01T00:00:00Z",
        environment={"onnxruntime": "x", "cpu_count": 2}, variants=variants,
        skipped=[{"ref": "old@1", "reason": "no model.onnx"}], pareto_batch_size=1,
        best=fastest_keeping(variants, 1),
    )  # fmt: skip


def test_chart_names_every_point_until_crowded_then_teacher_and_front() -> None:
    few = _crafted_report().variants
    assert chart_labels(few, 1) == ["t@1", "fast@1", "good@1", "slow@1"]
    crowd = few + [
        _variant(f"extra{i}@1", {1: 5.0 + i, 64: 50.0 + i}, 0.1) for i in range(MAX_LABELLED_POINTS)
    ]
    mark_pareto(crowd)
    assert chart_labels(crowd, 1) == ["t@1", "fast@1", "good@1"]  # the front at batch 1


def test_pareto_marking_and_fastest_variant_keeping_97_percent() -> None:
    report = _crafted_report()
    assert [v.on_pareto_front for v in report.variants] == [True, True, True, False]
    assert report.best is not None and report.best["ref"] == "good@1"
    assert report.best["speedup"] == {1: pytest.approx(10 / 0.9), 64: pytest.approx(100 / 9)}
    assert report.best["meets_target"] is True
    assert fastest_keeping(report.variants, 1, min_retention=0.99) is None


def test_write_report_writes_json_markdown_and_png(tmp_path: Path) -> None:
    report = _crafted_report()
    paths = write_report(report, tmp_path / "out", "cmp")
    data = json.loads(paths["json"].read_text())
    assert data["family"] == "t@1" and len(data["variants"]) == 4
    assert data["variants"][2]["latency"]["64"]["p50_ms"] == 9.0
    assert data["best"]["ref"] == "good@1"
    md = paths["md"].read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 4 and md.startswith("# Comparison: family of t@1")  # head, rule
    assert [line.count("★") for line in table[2:]] == [1, 1, 1, 0]
    assert "keeping ≥ 97% of the teacher's NDCG@10: **good@1**" in md
    assert "it meets the ≥ 10x target" in md and "old@1 (no model.onnx)" in md
    assert "2 CPUs (model and flags not recorded)" in md  # a report from before they were
    report.environment["cpu"] = {"model": "AMD EPYC", "flags": ["avx2", "avx512_vnni"]}
    md = write_report(report, tmp_path / "out2", "cmp")["md"].read_text()
    assert "2 CPUs (AMD EPYC, flags: avx2 avx512_vnni)" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


_cli = run  # the CLI runner of the CLI tests


def test_cli_unknown_teacher_exits_2_with_one_line(monkeypatch, capsys, store) -> None:
    code, _, err = _cli(monkeypatch, capsys, "compare", "nobody@1", "--store", str(store.root))
    assert code == 2 and "unknown model 'nobody'" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    # A teacher whose family is empty is an error too.
    code, _, err = _cli(monkeypatch, capsys, "compare", "t-student-int8-dynamic",
                        "--store", str(store.root))  # fmt: skip
    assert code == 2 and "no stored variant" in err and err.count("\n") == 1


def test_cli_compare_prints_the_table_and_writes_files(monkeypatch, capsys, store, tmp_path):
    code, out, err = _cli(monkeypatch, capsys, "compare", "t@1", "--store", str(store.root),
                          "--out", str(tmp_path), "--threads", "1", "--batch-size", "1",
                          "--batch-size", "4", "--repeats-b1", "3", "--repeats-b64", "2",
                          "--histories", "16")  # fmt: skip
    assert code == 0, err
    assert "| **t@1** (teacher)" in out and str(tmp_path / "compare-t-1.png") in out
    assert {p.name for p in tmp_path.iterdir()} == {
        "compare-t-1.json", "compare-t-1.md", "compare-t-1.png"
    }  # fmt: skip
