#!/usr/bin/env bash
# Issue 25's quality check: full vs sampled softmax teachers on Yelp and Amazon Sports, three
# seeds each, the same epoch budget (recipes/experiments/{yelp,sports}-teacher-{full,sampled}.toml),
# then benchmarks/loss_quality.py's table. Models already in the store are kept (resumes).
# Two trainings side by side, one thread each.
#
#   RECSYS_STORE=/path/to/models bash benchmarks/loss_quality.sh [SEEDS...]   # default 0 1 2
set -euo pipefail
cd "$(dirname "$0")/.."
. benchmarks/frozen.sh  # commit first: the jobs run HEAD's code, whatever changes meanwhile
: "${RECSYS_STORE:?set RECSYS_STORE to the store folder}"
export OMP_NUM_THREADS=1
SEEDS=("${@:-0 1 2}")
read -r -a SEEDS <<<"${SEEDS[*]}"
LOGS=benchmarks/results/loss-quality
mkdir -p "$RECSYS_STORE" "$LOGS"
run() {  # run SET LOSS SEED
  local name="$1-teacher-$2-s$3"
  [[ -d "$RECSYS_STORE/$name" ]] || recsys train --recipe "recipes/experiments/$1-teacher-$2.toml" \
    --seed "$3" --name "$name" --no-progress >"$LOGS/$name.log" 2>&1
}
running=0
for seed in "${SEEDS[@]}"; do
  for set in yelp sports; do
    for loss in full sampled; do
      run "$set" "$loss" "$seed" &
      running=$((running + 1))
      if ((running == 2)); then wait -n; running=$((running - 1)); fi
    done
  done
done
wait
python benchmarks/loss_quality.py --store "$RECSYS_STORE" --seeds "${SEEDS[@]}" --out "$LOGS"
