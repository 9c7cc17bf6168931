#!/usr/bin/env bash
# The headline over seeds: for each seed a teacher (recipes/ml1m-teacher.toml, 53 epochs), the
# 3/16 student distilled from it (recipes/ml1m-student.toml, 68 epochs), the student's INT8
# (item rows + dynamic), int4 and QAT int4 (3 epochs), and the teacher's INT8 at 50 items;
# models already in the store are kept and trainings cut short resume.
# Two jobs run side by side, one thread each. Then benchmarks/headline.py writes the table.
#
#   RECSYS_STORE=/path/to/models bash benchmarks/headline_seeds.sh [SEEDS...]   # default 0 1 2
#
# About 4 CPU-hours on a 2-core AVX-512 BF16 machine (teacher ~40 min on 2 threads, student
# ~62 min on one); a CPU without native bf16 takes longer for the same epochs.
LOGS="${BENCH_LOGS:-benchmarks/results/headline-ml1m}"
. "$(dirname "$0")/long_run.sh"  # commit first: the jobs run HEAD's code
teacher() {
  have "ml1m-teacher-s$1" || recsys train --recipe recipes/ml1m-teacher.toml --seed "$1" \
    --name "ml1m-teacher-s$1" --no-progress >>"$LOGS/teacher-s$1.log" 2>&1
}
student() {
  have "ml1m-student-s$1" || recsys distill --recipe recipes/ml1m-student.toml --seed "$1" \
    --teacher "ml1m-teacher-s$1@latest" --name "ml1m-student-s$1" --no-progress \
    >>"$LOGS/student-s$1.log" 2>&1
  have "ml1m-student-s$1-int8" || recsys quantize "ml1m-student-s$1@latest" --item-matrix \
    --name "ml1m-student-s$1-int8"
  have "ml1m-student-s$1-int4" || recsys quantize "ml1m-student-s$1@latest" --mode int4 \
    --name "ml1m-student-s$1-int4"
  have "ml1m-student-s$1-qat-int4" || recsys quantize "ml1m-student-s$1@latest" --mode int4 \
    --qat-epochs 3 --name "ml1m-student-s$1-qat-int4" >>"$LOGS/qat-s$1.log" 2>&1
}
teacher_ctx50() {  # the teacher's INT8 (item rows + dynamic) reading its last 50 items
  have "ml1m-teacher-s$1-int8-ctx50" || python - "$1" <<'PY'
import os, sys
from pathlib import Path
from compression.quantize.int8 import QuantizeConfig
from compression.variants import context_variant, quantize_variant
from model_store.store import ModelStore
seed, store = sys.argv[1], ModelStore(Path(os.environ["RECSYS_STORE"]))
q = quantize_variant(store, f"ml1m-teacher-s{seed}@latest", QuantizeConfig(), item_matrix=True,
                     name=f"ml1m-teacher-s{seed}-int8")
context_variant(store, f"{q.name}@{q.version}", 50, name=f"ml1m-teacher-s{seed}-int8-ctx50")
PY
}
family() { teacher "$1" && student "$1" && teacher_ctx50 "$1"; }
two_at_a_time family "${SEEDS[@]}"  # each family is a chain: teacher, then its student
python benchmarks/headline.py --store "$RECSYS_STORE" --seeds "${SEEDS[@]}" --out "$LOGS"
