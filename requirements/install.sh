#!/usr/bin/env bash
# Install the exact dev/CI environment into the active Python (a virtualenv is best):
# every package from requirements-dev.txt (versions and sha256 hashes), the CPU build of
# torch, then this project (editable, no dependency resolution of its own).
# PyTorch's CPU build is not on PyPI: where a local wheel is configured (pip's find-links,
# as on the project's CI machines) pip takes it; elsewhere it comes from PyTorch's CPU index
# (set TORCH_INDEX_URL to use a mirror). PyPI's plain `torch` would be a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="$(sed -n 's/^torch==//p' requirements/torch-cpu.txt)"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
pip=(python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --require-hashes --no-deps -r requirements-dev.txt
if ! "${pip[@]}" --no-deps --no-index "torch==${TORCH_VERSION}" 2>/dev/null; then
  "${pip[@]}" --no-deps --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"
fi
"${pip[@]}" --no-deps --no-build-isolation -e .
python -m pip check
