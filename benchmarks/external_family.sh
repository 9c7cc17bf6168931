#!/usr/bin/env bash
# Issue 26's acceptance family: a teacher trained outside the project (benchmarks/foreign_teacher.py:
# plain PyTorch modules, its own loop and item order, exported by torch.onnx.export) goes
# through `recsys build --recipe recipes/experiments/ml1m-external.toml`: imported, its INT8,
# the 3/16 student distilled from it, the student's INT8, the comparison report. The teacher
# file is kept once written and the build reuses (and resumes) every step, so a rerun continues.
#
#   RECSYS_STORE=/path/to/models bash benchmarks/external_family.sh
#
# About 2 hours on 2 cores, measured 2026-12-07: the teacher 44 min on two threads, the build
# 80 min on one (the student's teacher targets 12 min, its 68 epochs 65 min).
LOGS="${BENCH_LOGS:-benchmarks/results/foreign-teacher}"
. "$(dirname "$0")/long_run.sh"  # commit first: the jobs run HEAD's code
export OMP_NUM_THREADS=2  # one job at a time here
[[ -f "$LOGS/teacher.onnx" ]] || python benchmarks/foreign_teacher.py ../shared/data/ml-1m/ml-1m.txt \
  --out "$LOGS" --epochs 40 --hidden 128 --max-len 200 >>"$LOGS/teacher.log" 2>&1
recsys build --recipe recipes/experiments/ml1m-external.toml --store "$RECSYS_STORE" \
  --out "$LOGS" >>"$LOGS/build.log" 2>&1
