"""Training along the catalogue: seconds per epoch and peak memory, full softmax vs sampled.

For each catalogue size the same synthetic recipe (same users, same history lengths, so the
same number of interactions; power-law popularity with successor structure) is generated and
one model is trained for a few epochs with each loss, every run in its own process so its
peak resident memory is its own. An epoch's seconds exclude validation (full ranking over
the catalogue, reported apart). The full softmax is skipped where its logit chunk alone would
not fit (`--full-max-items`).

    python benchmarks/catalogue_scale.py --items 10000 100000 1000000 --out benchmarks/results

Writes catalogue-scale-train.json, .md and .png (the curves) under --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

LOSSES = ("full", "sampled-uniform")


def one_run(items: int, loss: str, args: argparse.Namespace) -> dict[str, object]:
    """Generate, train `args.epochs` epochs, report (runs inside the child process)."""
    import numpy as np
    import torch

    from compression.configs import ModelConfig, TrainConfig
    from compression.data.sequences import leave_one_out
    from compression.data.synthetic import SyntheticConfig, synthetic_dataset
    from compression.model.train import train

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    data = synthetic_dataset(
        SyntheticConfig(users=args.users, items=items, min_len=5, max_len=40, seed=args.seed)
    )
    generate_s = time.perf_counter() - started
    split = leave_one_out(data)
    cfg = ModelConfig(n_items=items, max_len=50, hidden=args.hidden, n_heads=2, dropout=0.2)
    train_cfg = TrainConfig(
        max_epochs=args.epochs, lr=1e-3, batch_size=128, loss=loss, negatives=args.negatives,
        threads=args.threads, patience=args.epochs,
    )  # fmt: skip
    started = time.perf_counter()
    result = train(cfg, train_cfg, split, progress=False, log=lambda _: None)
    wall_s = time.perf_counter() - started
    epochs = [r["epoch_s"] for r in result.history]
    return {
        "items": items,
        "loss": loss,
        "interactions": data.n_interactions,
        "users": data.n_users,
        "generate_s": round(generate_s, 2),
        "epoch_s": [round(e, 3) for e in epochs],
        "epoch_s_median": float(np.median(epochs[1:] if len(epochs) > 1 else epochs)),
        "validation_s_per_epoch": round((wall_s - sum(epochs)) / len(epochs), 2),
        "valid_ndcg@10": result.best_valid.get("ndcg@10"),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--losses", nargs="+", default=list(LOSSES))
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--negatives", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full-max-items", type=int, default=1_000_000)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # ITEMS:LOSS, in the child
    args = parser.parse_args()
    if args.one:
        items, loss = args.one.split(":")
        print(json.dumps(one_run(int(items), loss, args)))
        return
    rows = []
    for items in args.items:
        for loss in args.losses:
            if loss == "full" and items > args.full_max_items:
                continue
            child = [a for a in sys.argv[1:] if a != "--one"] + ["--one", f"{items}:{loss}"]
            proc = subprocess.run(
                [sys.executable, __file__, *child], capture_output=True, text=True
            )
            if proc.returncode:
                rows.append({"items": items, "loss": loss, "error": proc.stderr[-500:]})
            else:
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    write(rows, args)


def write(rows: list[dict[str, object]], args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "users": args.users,
        "hidden": args.hidden,
        "negatives": args.negatives,
        "epochs": args.epochs,
    }
    (out / "catalogue-scale-train.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=2)
    )
    base = {r["loss"]: r for r in rows if r.get("items") == min(args.items) and "error" not in r}
    lines = [
        "| items | loss | interactions | s/epoch (train) | vs smallest | validation s "
        "| peak RSS MB | valid NDCG@10 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['items']:,} | {r['loss']} | failed: {str(r['error'])[-80:]!r} |||||"
            )
            continue
        ref = base.get(str(r["loss"]))
        ratio = r["epoch_s_median"] / ref["epoch_s_median"] if ref else float("nan")
        lines.append(
            f"| {r['items']:,} | {r['loss']} | {r['interactions']:,} | {r['epoch_s_median']:.2f} "
            f"| {ratio:.2f}x | {r['validation_s_per_epoch']:.1f} | {r['peak_rss_mb']:,.0f} "
            f"| {r['valid_ndcg@10']:.4f} |"
        )
    (out / "catalogue-scale-train.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows, out / "catalogue-scale-train.png")


def plot(rows: list[dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for loss in sorted({str(r["loss"]) for r in rows}):
        done = [r for r in rows if r["loss"] == loss and "error" not in r]
        items = [r["items"] for r in done]
        left.plot(items, [r["epoch_s_median"] for r in done], marker="o", label=loss)
        right.plot(items, [r["peak_rss_mb"] for r in done], marker="o", label=loss)
    for ax, label in ((left, "seconds per epoch (training)"), (right, "peak RSS (MB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("catalogue (items)")
        ax.set_ylabel(label)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
