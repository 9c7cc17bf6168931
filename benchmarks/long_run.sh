# Sourced by the long benchmark scripts (headline_seeds.sh, loss_quality.sh, large_student.sh,
# bert_teachers.sh) for what they share:
#   LOGS="${BENCH_LOGS:-benchmarks/results/<name>}"; . "$(dirname "$0")/long_run.sh"
# (the script's "$@" are the seeds; BENCH_LOGS sends its logs and tables elsewhere)
# - Their Python runs from a snapshot of HEAD, so edits to the working tree during hours of
#   training cannot reach the running jobs (three 2-hour students died at publishing when the
#   exporter changed under them, 2026-12-06). Commit first.
# - RECSYS_STORE must be set; one thread per job; SEEDS from the arguments (default 0 1 2).
# - `have NAME`: the store holds NAME (steps already published are skipped, and trainings cut
#   short resume: docs/training.md), so a rerun continues where the last one stopped.
# - `two_at_a_time FN ARGS...`: `FN ARG` for each ARG (split on spaces), two side by side.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
: "${RECSYS_STORE:?set RECSYS_STORE to the store folder}"
: "${LOGS:?set LOGS before sourcing long_run.sh}"
FROZEN_SOURCE="$(mktemp -d -t recsys-frozen-XXXXXX)"
trap 'rm -rf "$FROZEN_SOURCE"' EXIT  # the scripts wait for their jobs before they exit
git archive HEAD | tar -x -C "$FROZEN_SOURCE"
export PYTHONPATH="$FROZEN_SOURCE${PYTHONPATH:+:$PYTHONPATH}"
echo "running the code of $(git rev-parse --short HEAD) from $FROZEN_SOURCE" >&2
export OMP_NUM_THREADS=1
SEEDS=("${@:-0 1 2}")
read -r -a SEEDS <<<"${SEEDS[*]}"
mkdir -p "$RECSYS_STORE" "$LOGS"
have() { [[ -d "$RECSYS_STORE/$1" ]]; }
two_at_a_time() {  # a failed job does not stop the others; the call then fails
  local fn="$1" arg running=0 failed=0
  shift
  for arg in "$@"; do
    # shellcheck disable=SC2086  # an ARG may carry several words ("yelp full 0")
    "$fn" $arg &
    running=$((running + 1))
    if ((running == 2)); then
      wait -n || failed=1
      running=$((running - 1))
    fi
  done
  while ((running > 0)); do
    wait -n || failed=1
    running=$((running - 1))
  done
  return "$failed"
}
