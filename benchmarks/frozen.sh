# Sourced by the long benchmark scripts: their Python runs from a snapshot of HEAD, so edits to
# the working tree during hours of training cannot reach the running jobs. (Three 2-hour
# students died at publishing when the exporter changed under them, 2026-12-06.)
FROZEN_SOURCE="$(mktemp -d -t recsys-frozen-XXXXXX)"
trap 'rm -rf "$FROZEN_SOURCE"' EXIT  # the scripts wait for their jobs before they exit
git archive HEAD | tar -x -C "$FROZEN_SOURCE"
export PYTHONPATH="$FROZEN_SOURCE${PYTHONPATH:+:$PYTHONPATH}"
echo "running the code of $(git rev-parse --short HEAD) from $FROZEN_SOURCE" >&2
