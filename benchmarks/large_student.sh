#!/usr/bin/env bash
# Issue 25's large-catalogue distillation: for each seed, a teacher on 100k synthetic items
# (recipes/experiments/synthetic-100k-teacher.toml, sampled loss) and its student
# (synthetic-100k-student.toml), then benchmarks/headline.py's table (retention per seed
# against its own teacher, mean ± sd). Models already in the store are kept and trainings
# cut short resume, so a rerun continues. Two families side by side, one thread each.
#
#   RECSYS_STORE=/path/to/models bash benchmarks/large_student.sh [SEEDS...]   # default 0 1 2
set -euo pipefail
cd "$(dirname "$0")/.."
. benchmarks/frozen.sh  # commit first: the jobs run HEAD's code, whatever changes meanwhile
: "${RECSYS_STORE:?set RECSYS_STORE to the store folder}"
export OMP_NUM_THREADS=1
SEEDS=("${@:-0 1 2}")
read -r -a SEEDS <<<"${SEEDS[*]}"
LOGS=benchmarks/results/large-student
mkdir -p "$RECSYS_STORE" "$LOGS"
have() { [[ -d "$RECSYS_STORE/$1" ]]; }
family() {
  local t="synthetic-100k-teacher-s$1" s="synthetic-100k-student-s$1"
  have "$t" || recsys train --recipe recipes/experiments/synthetic-100k-teacher.toml --seed "$1" \
    --name "$t" --no-progress >>"$LOGS/$t.log" 2>&1
  have "$s" || recsys distill --recipe recipes/experiments/synthetic-100k-student.toml \
    --seed "$1" --teacher "$t@latest" --name "$s" --no-progress >>"$LOGS/$s.log" 2>&1
}
running=0
for seed in "${SEEDS[@]}"; do
  family "$seed" &
  running=$((running + 1))
  if ((running == 2)); then wait -n; running=$((running - 1)); fi
done
wait
python benchmarks/headline.py --store "$RECSYS_STORE" --seeds "${SEEDS[@]}" \
  --teacher synthetic-100k-teacher --student synthetic-100k-student --out "$LOGS"
