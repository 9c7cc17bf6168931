"""What a batch-1 call costs per item of context: a stored graph fed the last N items of real
test histories, unpadded, for several N, next to its reference (e.g. the fp32 teacher at its
full context) in the same run. A least-squares line through the medians gives the fixed cost
per call and the cost per item, and so the longest context that could still be `--target`
times faster than the reference at batch 1.

Usage: python benchmarks/context_cost.py REFERENCE@V MODEL@V [--lengths 1 5 10 20 30 40 50]
       [--target 10] [--store DIR] [--out DIR] [--stem NAME]
Writes <out>/<stem>.json and .md. ONNX Runtime CPU, 1 intra-op thread like the service, warm
visits of 11 calls (the first untimed), models and lengths visited round-robin.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from compression.data.sequences import pad_left
from compression.export.exporter import INPUT_NAME, OUTPUT_NAME
from compression.report.compare import test_histories
from model_store.runtime import ort_session
from model_store.store import ModelStore

VISIT_RUNS = 11
VISITS = 100  # per (model, length): 1,000 timed calls


def _time_visits(session: object, feeds: list[np.ndarray], visits: int) -> list[float]:
    """ms of every timed call: `visits` visits of VISIT_RUNS calls, the first untimed."""
    out = []
    for v in range(visits):
        for r in range(VISIT_RUNS):
            feed = {INPUT_NAME: feeds[(v * VISIT_RUNS + r) % len(feeds)]}
            start = time.perf_counter_ns()
            session.run([OUTPUT_NAME], feed)  # type: ignore[attr-defined]
            if r:
                out.append((time.perf_counter_ns() - start) / 1e6)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("reference", help="NAME@VERSION timed at its own full context")
    parser.add_argument("model", help="NAME@VERSION timed at each length")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1, 5, 10, 20, 30, 40, 50])
    parser.add_argument("--target", type=float, default=10.0)
    parser.add_argument("--store", default=os.environ.get("RECSYS_STORE", "model_store/models"))
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--stem", default="context-cost")
    args = parser.parse_args()
    if min(args.lengths) < 1:
        parser.error(f"--lengths must be >= 1, got {args.lengths}")
    store = ModelStore(Path(args.store))
    (ref, ref_dir), (_, model_dir) = store.load(args.reference), store.load(args.model)
    ref_len = int(ref.architecture["max_len"])
    histories = [h for h in test_histories(ref) if len(h) >= max(args.lengths)][:200]
    sessions = {
        "ref": ort_session(ref_dir / "model.onnx", 1),
        "model": ort_session(model_dir / "model.onnx", 1),
    }
    feeds = {("ref", ref_len): [pad_left([h], ref_len, length=ref_len) for h in histories]}
    for n in args.lengths:
        feeds[("model", n)] = [np.asarray(h[-n:], dtype=np.int64)[None, :] for h in histories]
    times: dict[tuple[str, int], list[float]] = {key: [] for key in feeds}
    for key, batch in feeds.items():  # warm-up
        _time_visits(sessions[key[0]], batch, 2)
    for round_ in range(VISITS):
        keys = list(feeds)
        for i in range(len(keys)):
            key = keys[(round_ + i) % len(keys)]
            times[key] += _time_visits(sessions[key[0]], feeds[key], 1)
    ref_ms = float(np.median(times[("ref", ref_len)]))
    lengths = np.array(args.lengths, dtype=float)
    medians = np.array([np.median(times[("model", n)]) for n in args.lengths])
    per_item_ms, fixed_ms = np.polyfit(lengths, medians, 1)
    budget_ms = ref_ms / args.target
    longest = (budget_ms - fixed_ms) / per_item_ms if per_item_ms > 0 else float("inf")
    result = {
        "reference": args.reference,
        "reference_max_len": ref_len,
        "reference_p50_ms": ref_ms,
        "model": args.model,
        "lengths": args.lengths,
        "p50_ms": medians.tolist(),
        "p99_ms": [float(np.percentile(times[("model", n)], 99)) for n in args.lengths],
        "fixed_ms": float(fixed_ms),
        "per_item_ms": float(per_item_ms),
        "target": args.target,
        "budget_ms": budget_ms,
        "longest_context_for_target": float(longest),
        "histories": len(histories),
        "timed_calls": VISITS * (VISIT_RUNS - 1),
        "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"{args.model} fed the last N items of {len(histories)} test histories, unpadded, batch "
        f"1; {args.reference} at its {ref_len}-item context in the same run. ONNX Runtime CPU, "
        f"1 thread, warm visits of {VISIT_RUNS} calls (first untimed), "
        f"{result['timed_calls']} timed calls each, visited round-robin. {result['date']}.",
        "",
        "| items | p50 ms | p99 ms | speedup vs reference |",
        "|---|---|---|---|",
    ]
    for n, p50, p99 in zip(args.lengths, medians, result["p99_ms"], strict=True):
        lines.append(f"| {n} | {p50:.3f} | {p99:.3f} | {ref_ms / p50:.2f}x |")
    lines += [
        "",
        f"Reference p50 {ref_ms:.3f} ms. Fit: {fixed_ms:.3f} ms per call + {per_item_ms * 1000:.2f}"
        f" us per item; {args.target:g}x needs <= {budget_ms:.3f} ms, i.e. at most "
        f"{max(longest, 0):.0f} items.",
    ]
    (out / f"{args.stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
