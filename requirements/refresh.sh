#!/usr/bin/env bash
# Re-resolve the exact dev/CI environment (requirements-dev.txt) from pyproject.toml's ranges.
# Run after changing a dependency range, or to take newer releases on purpose; commit the lock.
# torch is resolved as its CPU build (requirements/torch-cpu.txt) and then left out of the lock:
# its wheel comes from PyTorch's CPU index (or a local wheel), not PyPI, so install.sh installs
# it by version. The project itself is left out too (install.sh installs it editable).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet "pip-tools==7.7.0"
compile() {  # compile EXTRA OUTPUT
  python -m piptools compile --quiet --extra "$1" --generate-hashes --allow-unsafe \
    --strip-extras --no-emit-index-url --no-emit-find-links -c requirements/torch-cpu.txt \
    -o "$2" pyproject.toml requirements/build.in
  python - "$2" <<'PY'
import re
import sys
from pathlib import Path

lock = Path(sys.argv[1])
# One entry = a requirement line, its hash continuation lines and its "# via" comment lines.
entries = re.split(r"\n(?=\S)", lock.read_text())
drop = re.compile(r"^(torch==|recsys-serve @ |# WARNING: pip install will require)")
kept = [e for e in entries if not drop.match(e)]
lock.write_text("\n".join(kept).rstrip("\n") + "\n")
PY
  echo "$2: $(grep -c '==' "$2") pinned packages"
}
compile dev requirements-dev.txt      # CI, development, training (+ torch, see above)
compile serve requirements-serve.txt  # the serving images (no torch)
