#!/usr/bin/env bash
# Issue 25's large-catalogue distillation: for each seed, a teacher on 100k synthetic items
# (recipes/experiments/synthetic-100k-teacher.toml, sampled loss) and its student
# (synthetic-100k-student.toml); on real data, a student of each Yelp full-softmax teacher
# (yelp-student.toml; the teachers are loss_quality.sh's, trained here when absent); then
# benchmarks/headline.py's tables (retention per seed against its own teacher, mean ± sd).
# Models already in the store are kept and trainings cut short resume, so a rerun continues.
# Two families side by side, one thread each.
#
#   RECSYS_STORE=/path/to/models bash benchmarks/large_student.sh [SEEDS...]   # default 0 1 2
LOGS="${BENCH_LOGS:-benchmarks/results/large-student}"
. "$(dirname "$0")/long_run.sh"  # commit first: the jobs run HEAD's code
family() {  # family TEACHER STUDENT SEED: recipes/experiments/{TEACHER,STUDENT}.toml
  local t="$1-s$3" s="$2-s$3"
  have "$t" || recsys train --recipe "recipes/experiments/$1.toml" --seed "$3" --name "$t" \
    --no-progress >>"$LOGS/$t.log" 2>&1
  have "$s" || recsys distill --recipe "recipes/experiments/$2.toml" --seed "$3" \
    --teacher "$t@latest" --name "$s" --no-progress >>"$LOGS/$s.log" 2>&1
}
two_at_a_time family "${SEEDS[@]/#/synthetic-100k-teacher synthetic-100k-student }" \
  "${SEEDS[@]/#/yelp-teacher-full yelp-student }"
python benchmarks/headline.py --store "$RECSYS_STORE" --seeds "${SEEDS[@]}" \
  --teacher synthetic-100k-teacher --student synthetic-100k-student --out "$LOGS"
python benchmarks/headline.py --store "$RECSYS_STORE" --seeds "${SEEDS[@]}" \
  --teacher yelp-teacher-full --student yelp-student --out "$LOGS/yelp"
