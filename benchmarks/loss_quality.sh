#!/usr/bin/env bash
# Issue 25's quality check: full vs sampled softmax teachers on Yelp and Amazon Sports, three
# seeds each, the same epoch budget (recipes/experiments/{yelp,sports}-teacher-{full,sampled}.toml),
# and on ML-1M the sampled loss (ml1m-teacher-sampled.toml) beside the full-softmax headline
# teachers; then benchmarks/loss_quality.py's table. Models already in the store are kept and
# trainings cut short resume. Two trainings side by side, one thread each.
#
#   RECSYS_STORE=/path/to/models bash benchmarks/loss_quality.sh [SEEDS...]   # default 0 1 2
LOGS="${BENCH_LOGS:-benchmarks/results/loss-quality}"
. "$(dirname "$0")/long_run.sh"  # commit first: the jobs run HEAD's code
run() {  # run SET LOSS SEED
  local name="$1-teacher-$2-s$3"
  have "$name" || recsys train --recipe "recipes/experiments/$1-teacher-$2.toml" \
    --seed "$3" --name "$name" --no-progress >>"$LOGS/$name.log" 2>&1
}
jobs=()
for seed in "${SEEDS[@]}"; do
  for set in yelp sports; do
    jobs+=("$set full $seed" "$set sampled $seed")  # each pair side by side: same conditions
  done
done
# ML-1M: the sampled loss beside the headline teachers (full softmax, headline_seeds.sh).
jobs+=("${SEEDS[@]/#/ml1m sampled }")
two_at_a_time run "${jobs[@]}"
python benchmarks/loss_quality.py --store "$RECSYS_STORE" --sets yelp sports ml1m \
  --seeds "${SEEDS[@]}" --out "$LOGS"
