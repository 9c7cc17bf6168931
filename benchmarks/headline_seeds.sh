#!/usr/bin/env bash
# The headline over seeds: for each seed a teacher (recipes/ml1m-teacher.toml, 53 epochs), the
# 3/16 student distilled from it (recipes/ml1m-student.toml, 68 epochs) and the student's INT8
# (item rows + dynamic); models already in the store are kept, so an interrupted run resumes.
# Two jobs run side by side, one thread each. Then benchmarks/headline.py writes the table.
#
#   RECSYS_STORE=/path/to/models bash benchmarks/headline_seeds.sh [SEEDS...]   # default 0 1 2
#
# About 4 CPU-hours on a 2-core AVX-512 BF16 machine (teacher ~40 min on 2 threads, student
# ~62 min on one); a CPU without native bf16 takes longer for the same epochs.
set -euo pipefail
cd "$(dirname "$0")/.."
. benchmarks/frozen.sh  # commit first: the jobs run HEAD's code, whatever changes meanwhile
: "${RECSYS_STORE:?set RECSYS_STORE to the store folder}"
export OMP_NUM_THREADS=1
SEEDS=("${@:-0 1 2}")
read -r -a SEEDS <<<"${SEEDS[*]}"
mkdir -p "$RECSYS_STORE" benchmarks/results/headline-ml1m
have() { [[ -d "$RECSYS_STORE/$1" ]]; }
teacher() {
  have "ml1m-teacher-s$1" || recsys train --recipe recipes/ml1m-teacher.toml --seed "$1" \
    --name "ml1m-teacher-s$1" --no-progress >"benchmarks/results/headline-ml1m/teacher-s$1.log" 2>&1
}
student() {
  have "ml1m-student-s$1" || recsys distill --recipe recipes/ml1m-student.toml --seed "$1" \
    --teacher "ml1m-teacher-s$1@latest" --name "ml1m-student-s$1" --no-progress \
    >"benchmarks/results/headline-ml1m/student-s$1.log" 2>&1
  have "ml1m-student-s$1-int8" || recsys quantize "ml1m-student-s$1@latest" --item-matrix \
    --name "ml1m-student-s$1-int8"
}
family() { teacher "$1" && student "$1"; }
# Two families at a time: each is a chain (teacher, then its student).
running=0
for seed in "${SEEDS[@]}"; do
  family "$seed" &
  running=$((running + 1))
  if ((running == 2)); then wait -n; running=$((running - 1)); fi
done
wait
python benchmarks/headline.py --store "$RECSYS_STORE" --seeds "${SEEDS[@]}" \
  --out benchmarks/results/headline-ml1m
