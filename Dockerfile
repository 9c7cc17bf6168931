# CPU image of recsys-serve: ONNX Runtime + FastAPI/uvicorn, no PyTorch (the [train] extra is
# never installed; the serving path imports torch only for GPU engines, and copes without it).
#
#   docker build -t recsys-serve:cpu .
#   docker run --rm -p 127.0.0.1:8000:8000 -v "$PWD/model_store/models:/models:ro" \
#     -e RECSYS_VARIANTS='{"full": "demo-teacher@latest"}' recsys-serve:cpu
#
# Every setting comes from RECSYS_* environment variables (app/settings.py); deploy/compose.yaml
# runs it next to Prometheus and Grafana. tests/unit/test_docker_files.py checks this file.
# Pinned by tag; pin the digest as well once it is resolved where a registry can be reached
# (python:3.11.10-slim-bookworm@sha256:...).

# --- build: install the package and its serving dependencies into a virtual environment ------
FROM python:3.11.10-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md ./
COPY requirements-serve.txt ./
COPY app ./app
COPY compression ./compression
COPY model_store ./model_store
COPY recsys_cli ./recsys_cli
# Exact versions and sha256 hashes from the serving lock (requirements/refresh.sh writes it),
# then the package itself without resolving anything. The last command fails the build if
# anything pulled PyTorch in.
RUN pip install --require-hashes --no-deps -r requirements-serve.txt \
    && pip install --no-deps --no-build-isolation . \
    && pip check \
    && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)"

# --- runtime: the virtual environment only, run as an unprivileged user -----------------------
FROM python:3.11.10-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    RECSYS_STORE=/models \
    RECSYS_HOST=0.0.0.0 \
    RECSYS_PORT=8000

RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin recsys \
    && mkdir -p /models
COPY --from=build /opt/venv /opt/venv

# Numeric UID so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
WORKDIR /tmp
# The model store is mounted here, read-only is enough (publishing happens offline).
VOLUME ["/models"]
EXPOSE 8000

# Liveness only: /healthz answers while variants still load (/readyz says when they are served).
# Python's urllib because the slim image has no curl.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('RECSYS_PORT', '8000'), timeout=2)"]

# One process per container, on purpose: each uvicorn worker would load its own copy of every
# model and run its own batch queue, so N workers mean N times the memory and batches N times
# smaller (the dynamic batcher only batches requests that reach the same process), and
# /metrics would show one worker at a time. Scale with more containers (replicas) instead;
# within one, ONNX Runtime's threads are RECSYS_INTRA_OP_THREADS.
CMD ["recsys", "serve"]
