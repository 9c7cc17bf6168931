"""The servers our service is measured against, each what a user would write first.

    python -m benchmarks.serving.peers bare  --port 8001
    python -m benchmarks.serving.peers ort   --port 8002 --model DIR   (a store version folder)
    python -m benchmarks.serving.peers torch --port 8003 --model DIR

- `bare`: FastAPI parses the same request body (same pydantic model) and returns a constant
  list: the ceiling of FastAPI + pydantic on this machine, no model at all.
- `ort`: FastAPI + onnxruntime, one request at a time in the handler, history padded to the
  model's full length, full argsort, pydantic response (the ~2.0k req/s peer of DESIGN §8).
- `torch`: the same with the PyTorch-eager checkpoint (`model.safetensors`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from app.schemas import RecommendRequest
from model_store.runtime import ort_session


class Item(BaseModel):
    item_id: int
    score: float


class Answer(BaseModel):
    items: list[Item]


def bare_app() -> FastAPI:
    app = FastAPI()
    constant = [{"item_id": 1000 + i, "score": 1.0 - i / 10} for i in range(10)]

    @app.post("/v1/recommend")
    async def recommend(body: RecommendRequest) -> dict:
        return {"items": constant, "variant": "bare", "model_version": "none@0"}

    return app


def model_app(folder: Path, kind: str) -> FastAPI:
    manifest = json.loads((folder / "manifest.json").read_text())
    max_len = manifest["architecture"]["max_len"]
    ids = json.loads((folder / "items.json").read_text())["item_ids"]
    to_internal = {int(o): i + 1 for i, o in enumerate(ids)}
    if kind == "ort":
        session = ort_session(folder / "model.onnx", threads=None)

        def score(x: np.ndarray) -> np.ndarray:
            return session.run(["scores"], {"item_ids": x})[0][0]
    else:
        import torch

        from compression.model.train import load_checkpoint
        from model_store.store import CHECKPOINT_FILE

        model = load_checkpoint(folder / CHECKPOINT_FILE).eval()

        def score(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return model(torch.from_numpy(x))[0].numpy()

    app = FastAPI()

    @app.post("/v1/recommend", response_model=Answer)
    async def recommend(body: RecommendRequest) -> Answer:
        known = [to_internal[i] for i in body.history if i in to_internal][-max_len:]
        x = np.zeros((1, max_len), dtype=np.int64)
        if known:
            x[0, -len(known) :] = known
        scores = score(x)
        scores[0] = -np.inf
        if body.exclude_history:
            scores[known] = -np.inf
        top = np.argsort(-scores)[: body.k]
        return Answer(items=[Item(item_id=int(ids[i - 1]), score=float(scores[i])) for i in top])

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["bare", "ort", "torch"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", type=Path, help="store version folder (ort, torch)")
    args = parser.parse_args()
    app = bare_app() if args.kind == "bare" else model_app(args.model, args.kind)
    # The same server settings as `recsys serve`: only the application differs.
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False,
                loop="uvloop", http="httptools")  # fmt: skip


if __name__ == "__main__":
    main()
