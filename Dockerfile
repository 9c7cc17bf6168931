# CPU image: the package with ONNX Runtime and the serving stack, no PyTorch.
# The model store is a volume: docker run -v $PWD/model_store/models:/models recsys-serve
FROM python:3.11.10-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    RECSYS_STORE=/models

WORKDIR /srv
COPY pyproject.toml README.md ./
COPY app ./app
COPY compression ./compression
COPY model_store ./model_store
COPY recsys_cli ./recsys_cli
RUN pip install ".[serve]" \
    && useradd --create-home --uid 10001 recsys \
    && mkdir -p /models && chown recsys /models

USER recsys
VOLUME ["/models"]
# Serving (`recsys serve`) arrives with the serving issue; until then the image inspects
# the mounted store.
CMD ["recsys", "store", "list"]
