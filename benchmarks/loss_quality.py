"""Sampled vs full softmax on the same epoch budget (issue 25's quality check), from a store:
per data set, the full-softmax teachers `<set>-teacher-full-s<seed>` (or the data set's
standard teachers `<set>-teacher-s<seed>`) and the sampled ones
`<set>-teacher-sampled-s<seed>`, as mean ± sd over seeds of test NDCG@10 / HR@10 and seconds
per epoch, and the sampled loss's share of the full one's NDCG@10 (the bar: 98%), seed by seed
(sampled seed N against full seed N) as mean ± sd.

    python benchmarks/loss_quality.py --store /path/to/models --sets yelp sports \
        --seeds 0 1 2 --out benchmarks/results/loss-quality

Writes loss-quality.json and loss-quality.md under --out. `benchmarks/loss_quality.sh` trains
the models first.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tables import mean_sd, write_results

from model_store.store import ModelStore, StoreError

LOSSES = ("full", "sampled")


def run_row(store: ModelStore, name: str) -> dict[str, float] | None:
    try:
        manifest, _ = store.resolve(f"{name}@latest")
    except StoreError:
        return None
    m = manifest.metrics
    return {
        "test_ndcg@10": m["test_ndcg@10"],
        "test_hr@10": m["test_hr@10"],
        "epochs": m["epochs"],
        "seconds_per_epoch": m["train_wall_s"] / max(m["epochs"], 1.0),
    }


def _run_of(store: ModelStore, data_set: str, loss: str, seed: int) -> dict[str, float] | None:
    """`<set>-teacher-<loss>-s<seed>`; for the full softmax also the data set's standard
    teacher `<set>-teacher-s<seed>` (ML-1M's headline teachers are full-softmax ones)."""
    found = run_row(store, f"{data_set}-teacher-{loss}-s{seed}")
    if found is None and loss == "full":
        found = run_row(store, f"{data_set}-teacher-s{seed}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--sets", nargs="+", default=["yelp", "sports"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="benchmarks/results/loss-quality")
    args = parser.parse_args()
    store = ModelStore(Path(args.store))
    summary: dict[str, dict[str, object]] = {}
    lines = [
        "| data set | loss | seeds | NDCG@10 | HR@10 | s / epoch | NDCG@10 vs full |",
        "|---|---|---|---|---|---|---|",
    ]
    for data_set in args.sets:
        by_seed = {loss: {seed: _run_of(store, data_set, loss, seed) for seed in args.seeds}
                   for loss in LOSSES}  # fmt: skip
        runs = {loss: [r for r in rows.values() if r is not None] for loss, rows in by_seed.items()}
        shares = [
            sampled["test_ndcg@10"] / full["test_ndcg@10"]
            for seed in args.seeds
            if (full := by_seed["full"][seed]) and (sampled := by_seed["sampled"][seed])
        ]
        stats = {
            loss: {key: mean_sd([r[key] for r in rows]) for key in rows[0]} if rows else {}
            for loss, rows in runs.items()
        }
        share = mean_sd(shares) if shares else None
        summary[data_set] = {"runs": runs, "stats": stats, "sampled_share_of_full": share}
        for loss in LOSSES:
            s = stats[loss]
            if not s:
                lines.append(f"| {data_set} | {loss} | missing | | | | |")
                continue
            cell = "{0[mean]:.4f} ± {0[sd]:.4f}".format
            vs_full = "100%" if loss == "full" else "-"
            if loss == "sampled" and share:
                vs_full = f"{share['mean']:.1%} ± {share['sd']:.1%} ({len(shares)} pairs)"
            lines.append(
                f"| {data_set} | {loss} | {len(runs[loss])} | {cell(s['test_ndcg@10'])} "
                f"| {cell(s['test_hr@10'])} | {s['seconds_per_epoch']['mean']:.1f} | {vs_full} |"
            )
    write_results(args.out, "loss-quality", summary, lines)


if __name__ == "__main__":
    main()
