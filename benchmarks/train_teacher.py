"""Train a teacher from a recipe, publish it, write what was measured as JSON + markdown.

Usage: python benchmarks/train_teacher.py recipes/ml1m-teacher.toml
    [--store DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from compression.configs import load_recipe
from compression.pipeline import train_teacher
from model_store.store import ModelStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("recipe")
    parser.add_argument("--store", default=os.environ.get("RECSYS_STORE", "model_store/models"))
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    report = train_teacher(recipe, ModelStore(Path(args.store)), progress=False)
    result = {
        "recipe": args.recipe,
        "model": f"{report.manifest.name}@{report.manifest.version}",
        "dataset": recipe.data.path.rsplit("/", 1)[-1],
        "params": report.params,
        "epochs": report.epochs,
        "best_epoch": report.best_epoch,
        "stopped_by": report.stopped_by,
        "train_wall_s": round(report.wall_s, 1),
        "test": report.test,
        "valid": report.valid,
        "popularity_test": report.popularity_test,
        "machine": {
            "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "date": time.strftime("%Y-%m-%d"),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"teacher-{recipe.name}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [
        "| model | params | epochs (best) | wall | HR@10 | NDCG@10 | HR@20 | NDCG@20 | MRR |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, m in (("SASRec+ teacher", report.test), ("popularity", report.popularity_test)):
        params = f"{report.params:,}" if label != "popularity" else "-"
        epochs = f"{report.epochs} ({report.best_epoch})" if label != "popularity" else "-"
        wall = f"{report.wall_s / 60:.1f} min" if label != "popularity" else "-"
        rows.append(
            f"| {label} | {params} | {epochs} | {wall} | {m['hr@10']:.4f} | {m['ndcg@10']:.4f} "
            f"| {m['hr@20']:.4f} | {m['ndcg@20']:.4f} | {m['mrr']:.4f} |"
        )
    (out / f"{stem}.md").write_text(
        f"Test, full ranking, history masked; {result['dataset']}; "
        f"{result['machine']['cpu_threads']} CPU threads.\n\n" + "\n".join(rows) + "\n"
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
