"""How wide must a student's item space be? The teacher's tied item matrix replaced by
low-rank approximations at equal parameter budgets, evaluated without any retraining.

Uniform: one rank-r SVD of the whole matrix. Mixed: items ranked by training popularity
and cut into buckets, each bucket approximated by its own SVD at its own rank (the
structure of mixed-dimension embeddings, a retired student option: docs/distillation.md).
A retrained student adapts its vectors, so these are lower bounds, but they show where the
teacher's ranking quality lives.

Usage: python benchmarks/item_rank.py ml1m-teacher-windows@1 [--store DIR] [--out DIR]
Writes benchmarks/results/item-rank-<teacher>.json and .md (test set, full ranking).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from compression.data.sequences import leave_one_out
from compression.evaluate.metrics import evaluate_model
from compression.model.train import load_checkpoint
from compression.variants import load_model_data
from model_store.store import CHECKPOINT_FILE, ModelStore

# (items, rank) per bucket, most popular first; the last bucket takes the rest.
LAYOUTS: dict[str, list[tuple[int, int]]] = {
    "uniform r=8": [(0, 8)],
    "uniform r=16": [(0, 16)],
    "uniform r=32": [(0, 32)],
    "uniform r=64": [(0, 64)],
    "mixed 300x48 + 900x16 + rest x8": [(300, 48), (900, 16), (0, 8)],
    "mixed 500x48 + 1000x12 + rest x4": [(500, 48), (1000, 12), (0, 4)],
    "mixed 1000x32 + rest x8": [(1000, 32), (0, 8)],
    "mixed 500x40 + 1000x16 + rest x8 (ml1m-student-mixed)": [(500, 40), (1000, 16), (0, 8)],
}


def approximate(weight: torch.Tensor, order: np.ndarray, layout: list[tuple[int, int]]):
    """The matrix with each popularity bucket replaced by its best rank-r approximation,
    and the parameters such a factorization stores (vectors + one projection per bucket)."""
    out, start, params = weight.clone(), 0, 0
    for i, (size, rank) in enumerate(layout):
        stop = len(order) if i == len(layout) - 1 else start + size
        idx = torch.as_tensor(order[start:stop])
        u, s, vh = torch.linalg.svd(weight[idx], full_matrices=False)
        out[idx] = (u[:, :rank] * s[:rank]) @ vh[:rank]
        params += len(idx) * rank + rank * weight.shape[1]
        start = stop
    return out, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("teacher", help="NAME@VERSION of a stored PyTorch model")
    parser.add_argument("--store", default=os.environ.get("RECSYS_STORE", "model_store/models"))
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    store = ModelStore(Path(args.store))
    manifest, folder = store.load(args.teacher)
    split = leave_one_out(load_model_data(manifest))
    teacher = load_checkpoint(folder / CHECKPOINT_FILE)
    counts = split.item_counts()
    order = np.argsort(-np.asarray(counts)[1:], kind="stable") + 1  # most trained-on first
    weight = teacher.output_weight.detach()
    full = evaluate_model(teacher, split, "test")
    rows = [{"layout": "teacher (full rank)", "params": int(weight[1:].numel()), **full}]
    for name, layout in LAYOUTS.items():
        model = copy.deepcopy(teacher)
        approx, params = approximate(weight, order, layout)
        with torch.no_grad():
            model.item_emb.weight.copy_(approx)
        rows.append({"layout": name, "params": params, **evaluate_model(model, split, "test")})
        print(rows[-1]["layout"], params, round(rows[-1]["ndcg@10"], 4), flush=True)
    top = {k: float(np.isin(split.test_target, order[:k]).mean()) for k in (500, 1500)}
    ref = f"{manifest.name}@{manifest.version}"
    result = {
        "teacher": ref,
        "dataset": manifest.dataset.name,
        "item_matrix": list(weight[1:].shape),
        "test_targets_in_top_items": top,
        "rows": rows,
        "date": time.strftime("%Y-%m-%d"),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"item-rank-{manifest.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"Teacher {ref} ({manifest.dataset.name}), item matrix {weight.shape[0] - 1:,} x "
        f"{weight.shape[1]} replaced by low-rank approximations, no retraining; test set, "
        f"full ranking, history masked. Test targets among the 500 / 1,500 most popular "
        f"items: {top[500]:.0%} / {top[1500]:.0%}.",
        "",
        "| item matrix | stored parameters | NDCG@10 | retention | HR@10 |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layout']} | {r['params']:,} | {r['ndcg@10']:.4f} | "
            f"{r['ndcg@10'] / full['ndcg@10']:.1%} | {r['hr@10']:.4f} |"
        )
    (out / f"item-rank-{manifest.name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
