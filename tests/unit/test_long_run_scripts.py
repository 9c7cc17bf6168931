"""The long benchmark scripts (benchmarks/*.sh, through benchmarks/long_run.sh), run with a
fake `recsys` that checks every recipe exists and every teacher is published before its
student: each model trained once, and a rerun trains nothing already published."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

FAKE_RECSYS = """#!/usr/bin/env bash
echo "recsys $*" >> "$CALLS"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --recipe) [[ -f "$2" ]] || { echo "no recipe $2" >&2; exit 2; } ;;
    --teacher) [[ -d "$RECSYS_STORE/${2%@latest}" ]] || { echo "no teacher $2" >&2; exit 2; } ;;
    --name) mkdir -p "$RECSYS_STORE/$2" ;;
  esac
  shift
done
"""


def _run(tmp_path: Path, script: str = "bert_teachers.sh") -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in {"recsys": FAKE_RECSYS, "python": 'echo "python $*" >> "$CALLS"\n'}.items():
        (bin_dir / name).write_text(body if body.startswith("#!") else "#!/bin/sh\n" + body)
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.unlink(missing_ok=True)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls),
           "RECSYS_STORE": str(tmp_path / "store"),
           "BENCH_LOGS": str(tmp_path / "logs")}  # fmt: skip
    results = REPO_ROOT / "benchmarks" / "results"
    before = sorted(results.rglob("*"))
    subprocess.run(
        ["bash", f"benchmarks/{script}", "0", "1"], cwd=REPO_ROOT, env=env, check=True,
        capture_output=True, text=True,
    )  # fmt: skip
    assert sorted(results.rglob("*")) == before  # nothing written into the source tree
    return calls.read_text().splitlines()


def test_bert_script_trains_each_family_once(tmp_path: Path) -> None:
    calls = _run(tmp_path)
    trained = [c.split("--name ")[1].split()[0] for c in calls if c.startswith("recsys")]
    expected = {f"{s}-{kind}{role}-s{seed}" for s in ("ml1m", "beauty") for seed in (0, 1)
                for kind in ("", "bert-") for role in ("teacher", "student")}  # fmt: skip
    assert sorted(trained) == sorted(expected)  # each once, teachers first (fake checks)
    for set_ in ("ml1m", "beauty"):
        students = [c for c in calls if f"--name {set_}-" in c and c.startswith("recsys distill")]
        recipes = {c.split("--recipe ")[1].split()[0] for c in students}
        assert recipes == {f"recipes/{set_}-student.toml"}  # one student recipe, both teachers
    tables = [c for c in calls if c.startswith("python benchmarks/headline.py")]
    assert len(tables) == 4
    assert not [c for c in _run(tmp_path) if c.startswith("recsys")]  # all published: none


@pytest.mark.parametrize(
    ("script", "names"),
    [
        ("headline_seeds.sh", ["ml1m-teacher-s{s}", "ml1m-student-s{s}", "ml1m-student-s{s}-int8",
                               "ml1m-student-s{s}-int4", "ml1m-student-s{s}-qat-int4"]),
        ("loss_quality.sh", [f"{d}-teacher-{loss}-s{{s}}" for d in ("yelp", "sports")
                             for loss in ("full", "sampled")] + ["ml1m-teacher-sampled-s{s}"]),
        ("large_student.sh", ["synthetic-100k-teacher-s{s}", "synthetic-100k-student-s{s}",
                              "yelp-teacher-full-s{s}", "yelp-student-s{s}"]),
    ],
)  # fmt: skip
def test_each_script_trains_each_model_once(script: str, names: list[str], tmp_path: Path) -> None:
    calls = _run(tmp_path, script)
    made = [c.split("--name ")[1].split()[0] for c in calls if c.startswith("recsys")]
    assert sorted(made) == sorted(n.format(s=s) for n in names for s in (0, 1))
    assert [c for c in calls if c.startswith("python benchmarks/")]  # its table
    assert not [c for c in _run(tmp_path, script) if c.startswith("recsys")]


def test_the_external_family_trains_the_foreign_teacher_then_builds(tmp_path: Path) -> None:
    calls = _run(tmp_path, "external_family.sh")
    assert calls[0].startswith("python benchmarks/foreign_teacher.py ../shared/data/ml-1m/")
    assert f"--out {tmp_path / 'logs'}" in calls[0]
    assert calls[1].startswith("recsys build --recipe recipes/experiments/ml1m-external.toml")
    (tmp_path / "logs" / "teacher.onnx").write_bytes(b"")  # written: not trained again
    assert [c.split()[:2] for c in _run(tmp_path, "external_family.sh")] == [["recsys", "build"]]
