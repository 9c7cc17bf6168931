"""Training-step speed of each mode, side by side in one run, on the same batches.

Modes: fp32 with the full logit matrix (plain PyTorch), chunked cross-entropy, bf16 autocast,
cheap dropout masks (our default = all three), and torch.compile on top of the default.
Reports the median over repetitions of the time for a fixed set of real length-bucketed
batches, scaled to one epoch.

Usage: python benchmarks/train_speed.py [--data ../shared/data/ml-1m/ml-1m.txt] [--hidden 128]
       [--modes 0,1,2,3,4,5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from compression.configs import ModelConfig
from compression.data.load import load_dataset
from compression.data.sequences import leave_one_out, pad_left
from compression.model.losses import full_softmax_ce
from compression.model.sasrec import FastDropout, SASRec
from compression.model.train import (
    length_bucketed_batches,
    training_pairs,
    tune_allocator,
)


def plain_ce(model: SASRec, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    hidden = model.encode(x)
    valid = y > 0
    logits = hidden[valid] @ model.output_weight[1:].T
    return F.cross_entropy(logits.float(), y[valid] - 1)


def chunked_ce(model: SASRec, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    hidden = model.encode(x)
    valid = y > 0
    return full_softmax_ce(hidden[valid], model.output_weight[1:], y[valid] - 1, 2048)


def use_torch_dropout(model: SASRec, p: float) -> None:
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, FastDropout):
                setattr(module, child_name, nn.Dropout(p))
        del name


MODES: dict[str, dict[str, object]] = {
    "fp32, full logits, nn.Dropout": {"loss": plain_ce, "bf16": False, "fast_drop": False},
    "fp32, chunked CE, nn.Dropout": {"loss": chunked_ce, "bf16": False, "fast_drop": False},
    "bf16, full logits, nn.Dropout": {"loss": plain_ce, "bf16": True, "fast_drop": False},
    "bf16, chunked CE, nn.Dropout": {"loss": chunked_ce, "bf16": True, "fast_drop": False},
    "bf16, chunked CE, fast dropout (default)": {
        "loss": chunked_ce,
        "bf16": True,
        "fast_drop": True,
    },
    "default + torch.compile": {
        "loss": chunked_ce,
        "bf16": True,
        "fast_drop": True,
        "compile": True,
    },
}


def time_mode(
    cfg: ModelConfig,
    mode: dict[str, object],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    reps: int,
) -> list[float]:
    torch.manual_seed(0)
    model = SASRec(cfg).train()
    if not mode["fast_drop"]:
        use_torch_dropout(model, cfg.dropout)
    loss_fn: Callable = mode["loss"]  # type: ignore[assignment]
    if mode.get("compile"):
        model.encode = torch.compile(model.encode, dynamic=True)  # type: ignore[method-assign]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def one_pass() -> float:
        start = time.perf_counter()
        for x, y in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(mode["bf16"])):
                loss = loss_fn(model, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return time.perf_counter() - start

    one_pass()  # warm-up (and compilation)
    return [one_pass() for _ in range(reps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="../shared/data/ml-1m/ml-1m.txt")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--max-len", type=int, default=200)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--modes",
        default="0,1,2,3,4",
        help="comma-separated mode indices; 5 = torch.compile (compiling takes many minutes)",
    )
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    tune_allocator()
    data = load_dataset(args.data)
    split = leave_one_out(data)
    inputs, targets = training_pairs(split.train, args.max_len)
    lengths = np.array([len(x) for x in inputs])
    order = list(length_bucketed_batches(lengths, 128, np.random.default_rng(0)))
    picked = order[: args.batches]
    batches = [
        (
            torch.from_numpy(pad_left([inputs[i] for i in b], args.max_len)),
            torch.from_numpy(pad_left([targets[i] for i in b], args.max_len)),
        )
        for b in picked
    ]
    share = sum(int(lengths[b].sum()) for b in picked) / int(lengths.sum())
    cfg = ModelConfig(
        n_items=data.n_items,
        max_len=args.max_len,
        hidden=args.hidden,
        n_blocks=2,
        n_heads=2,
        ffn=2 * args.hidden,
        dropout=0.2,
    )
    names = [list(MODES)[int(i)] for i in args.modes.split(",")]
    rows = []
    for name in names:
        try:
            times = time_mode(cfg, MODES[name], batches, args.reps)
        except Exception as exc:  # e.g. torch.compile without a working compiler
            print(f"{name}: failed ({type(exc).__name__}: {exc})", flush=True)
            rows.append({"mode": name, "error": f"{type(exc).__name__}: {exc}"[:300]})
            continue
        median = statistics.median(times)
        rows.append(
            {"mode": name, "median_s": median, "times_s": times, "epoch_s_estimate": median / share}
        )
        print(f"{name:45s} {median:7.2f} s  ~{median / share:6.1f} s/epoch", flush=True)
    base = rows[0].get("median_s")
    for row in rows:
        if base and "median_s" in row:
            row["speedup_vs_first"] = base / row["median_s"]
    result = {
        "data": Path(args.data).name,
        "hidden": args.hidden,
        "max_len": args.max_len,
        "batch_size": 128,
        "batches_timed": len(batches),
        "share_of_epoch": share,
        "reps": args.reps,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"train_speed_h{args.hidden}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"Training speed, {result['data']}, hidden {args.hidden}, 2 blocks, batch 128, "
        f"max length {args.max_len}, {result['threads']} threads; median of {args.reps} passes "
        f"over the same {len(batches)} length-bucketed batches ({share:.1%} of an epoch).",
        "",
        "| mode | s per epoch (est.) | speed-up vs first row |",
        "|---|---|---|",
    ]
    lines += [
        f"| {r['mode']} | {r['epoch_s_estimate']:.1f} | {r['speedup_vs_first']:.2f}x |"
        for r in rows
    ]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
