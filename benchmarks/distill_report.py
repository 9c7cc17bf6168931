"""Table of a teacher and every student published from it, read from the store manifests.

Usage: python benchmarks/distill_report.py beauty-teacher@1 [--store DIR] [--out DIR]
Writes benchmarks/results/distill-<teacher>.json and .md (test set, full ranking).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from model_store.store import ModelStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("teacher", help="NAME@VERSION of the teacher")
    parser.add_argument("--store", default=os.environ.get("RECSYS_STORE", "model_store/models"))
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    store = ModelStore(Path(args.store))
    teacher, _ = store.resolve(args.teacher)
    ref = f"{teacher.name}@{teacher.version}"
    students = [m for m in store.list() if m.parent == ref and m.kind.startswith("student")]
    rows = []
    for m in [teacher, *students]:
        distill = m.recipe.get("distill")
        rows.append(
            {
                "model": f"{m.name}@{m.version}",
                "kind": m.kind,
                "training": "teacher"
                if m.kind == "teacher"
                else (
                    "labels only"
                    if distill is None
                    else f"{distill['strategy']} a={distill['alpha']} T={distill['temperature']} "
                    f"b={distill['beta']}"
                )
                + _averaged(m.recipe),
                "max_len": m.architecture["max_len"],
                "transformer": _transformer(m.architecture),
                "items": _item_vectors(m.architecture),
                "dropout": m.architecture["dropout"],
                "params": int(m.metrics["params"]),
                "params_ratio": m.metrics.get("params_ratio", 1.0),
                "test_ndcg@10": m.metrics["test_ndcg@10"],
                "test_hr@10": m.metrics["test_hr@10"],
                "ndcg_retention": m.metrics.get("ndcg_retention", 1.0),
                "epochs": int(m.metrics["epochs"]),
                "train_wall_s": m.metrics["train_wall_s"],
            }
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"distill-{teacher.name}"
    (out / f"{stem}.json").write_text(json.dumps({"teacher": ref, "rows": rows}, indent=2) + "\n")
    lines = [
        f"Teacher {ref} ({teacher.dataset.name}); test set, full ranking, history masked.",
        "",
        "| model | training | max len | item vectors | transformer | dropout | params (ratio) "
        "| NDCG@10 | HR@10 | retention | epochs | wall |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['training']} | {r['max_len']} | {r['items']} "
            f"| {r['transformer']} | {r['dropout']} "
            f"| {r['params']:,} "
            f"({r['params_ratio']:.3f}) | {r['test_ndcg@10']:.4f} | {r['test_hr@10']:.4f} "
            f"| {r['ndcg_retention']:.1%} | {r['epochs']} | {r['train_wall_s'] / 60:.1f} min |"
        )
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _averaged(recipe: dict) -> str:
    span = recipe.get("train", {}).get("ema_epochs")
    return f", weights averaged over {span:g} epochs" if span else ""


def _transformer(arch: dict) -> str:
    """'hidden 40, 2 blocks, FFN 64'."""
    ffn = arch.get("ffn") or arch["hidden"]
    return f"hidden {arch['hidden']}, {arch['n_blocks']} blocks, FFN {ffn}"


def _item_vectors(arch: dict) -> str:
    """Item vector width, and '+ 2 successors' with successor lists."""
    lists = f" + {arch['successors']} successors" if arch.get("successors") else ""
    return str(arch.get("emb_dim") or arch["hidden"]) + lists


if __name__ == "__main__":
    main()
