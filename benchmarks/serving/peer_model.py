"""Publish the peer-comparison model of DESIGN §8: hidden 64, 2 blocks, length 200, on a
stored model's catalogue (its item mapping), with RANDOM weights: serving speed does not
depend on the weights, and the manifest says so (kind `benchmark-random`).

    python -m benchmarks.serving.peer_model --like ml1m-teacher@latest --name ml1m-h64-random
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from compression.configs import ModelConfig
from compression.export.exporter import export_onnx
from compression.model.sasrec import SASRec
from model_store.store import ModelStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="model_store/models")
    parser.add_argument("--like", required=True, help="stored model whose catalogue to use")
    parser.add_argument("--name", default="ml1m-h64-random")
    args = parser.parse_args()
    store = ModelStore(args.store)
    like, folder = store.load(args.like)
    torch.manual_seed(0)
    cfg = ModelConfig(n_items=like.dataset.n_items, max_len=200, hidden=64, n_blocks=2, n_heads=1)
    model = SASRec(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        export_onnx(model, onnx_path)
        m = store.publish(
            args.name, {"model.onnx": onnx_path, "items.json": folder / like.item_mapping},
            kind="benchmark-random", parent=None, architecture=cfg.model_dump(),
            recipe={"note": "random weights, for serving-speed comparisons only",
                    "data": like.recipe.get("data", {})},
            dataset=like.dataset, metrics={"params": float(model.num_parameters())},
            signature=like.signature,
        )  # fmt: skip
    print(f"published {m.name}@{m.version}")


if __name__ == "__main__":
    main()
