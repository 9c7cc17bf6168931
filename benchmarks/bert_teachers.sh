#!/usr/bin/env bash
# Issue 26's BERT-style teacher against the SASRec teacher, per data set and seed:
#   <set>-bert-teacher-sN    recipes/experiments/<set>-bert-teacher.toml (cloze, bidirectional)
#   <set>-bert-student-sN    the data set's student recipe, distilled from it
#   <set>-teacher-sN, <set>-student-sN   the same with the SASRec teacher (ML-1M: the headline
#                            families of headline_seeds.sh; Beauty: trained here)
# The students share one recipe (architecture, epochs, distillation) per data set, so the two
# teachers are compared at the same student budget. Models already in the store are kept and
# trainings cut short resume (docs/training.md), so a rerun continues. One thread per job, two
# jobs side by side; then benchmarks/headline.py writes a table per teacher kind and data set.
#
#   RECSYS_STORE=/path/to/models bash benchmarks/bert_teachers.sh [SEEDS...]   # default 0 1 2
LOGS="${BENCH_LOGS:-benchmarks/results/bert-teachers}"
. "$(dirname "$0")/long_run.sh"  # commit first: the jobs run HEAD's code
teacher() {  # teacher NAME RECIPE SEED
  have "$1" || recsys train --recipe "$2" --seed "$3" --name "$1" --no-progress >>"$LOGS/$1.log" 2>&1
}
student() {  # student NAME RECIPE TEACHER SEED
  have "$1" || recsys distill --recipe "$2" --seed "$4" --teacher "$3@latest" --name "$1" \
    --no-progress >>"$LOGS/$1.log" 2>&1
}
family() {  # family SET SEED
  local set="$1" s="$2"
  if [[ "$set" == ml1m ]]; then
    teacher "ml1m-teacher-s$s" recipes/ml1m-teacher.toml "$s"
    student "ml1m-student-s$s" recipes/ml1m-student.toml "ml1m-teacher-s$s" "$s"
  else
    teacher "beauty-teacher-s$s" recipes/beauty-teacher-d03.toml "$s"
    student "beauty-student-s$s" recipes/beauty-student.toml "beauty-teacher-s$s" "$s"
  fi
  teacher "$set-bert-teacher-s$s" "recipes/experiments/$set-bert-teacher.toml" "$s"
  student "$set-bert-student-s$s" "recipes/$set-student.toml" "$set-bert-teacher-s$s" "$s"
}
two_at_a_time family "${SEEDS[@]/#/beauty }" "${SEEDS[@]/#/ml1m }"
for set in beauty ml1m; do
  for kind in "" "bert-"; do
    python benchmarks/headline.py --store "$RECSYS_STORE" --seeds "${SEEDS[@]}" \
      --teacher "$set-${kind}teacher" --student "$set-${kind}student" --out "$LOGS/$set-${kind:-sasrec-}table"
  done
done
