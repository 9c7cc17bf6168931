"""How much the timing protocol moves a comparison report's latencies: the same models timed
warm (visits of 11 calls, the first untimed: a service calling one model again and again)
and cold (single calls in rotation), at 1 and 2 intra-op threads, side by side in one run.
Also the per-call floor of each graph: a 1-item history fed unpadded (`[1, 1]`), where the
compute is next to nothing and what is left is the cost of running the graph's nodes.

Usage: python benchmarks/timing_protocol.py REFERENCE@V MODEL@V ... [--store DIR] [--out DIR]
       [--stem NAME]
The first model is the reference of the speedups. Writes <out>/<stem>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from compression.export.exporter import INPUT_NAME, OUTPUT_NAME
from compression.report.compare import measure_latency, test_histories
from model_store.runtime import ort_session
from model_store.store import ModelStore

SETTINGS = [(1, 11), (1, 1), (2, 11), (2, 1)]  # (threads, visit_runs)
REPEATS = {1: 200, 64: 50}


def _one_item_p50_ms(session: object, histories: list[np.ndarray], runs: int = 200) -> float:
    """Median ms of warm calls on one-item histories, unpadded: the graph's per-call floor."""
    feeds = [{INPUT_NAME: np.array([[h[-1]]], dtype=np.int64)} for h in histories[:runs]]
    for feed in feeds[:20]:
        session.run([OUTPUT_NAME], feed)  # type: ignore[attr-defined]
    times = []
    for feed in feeds:
        start = time.perf_counter_ns()
        session.run([OUTPUT_NAME], feed)  # type: ignore[attr-defined]
        times.append((time.perf_counter_ns() - start) / 1e6)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("models", nargs="+", help="NAME@VERSION; the first is the reference")
    parser.add_argument("--store", default=os.environ.get("RECSYS_STORE", "model_store/models"))
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--stem", default="timing-protocol")
    args = parser.parse_args()
    store = ModelStore(Path(args.store))
    loaded = [store.load(ref) for ref in args.models]
    histories = [h for h in test_histories(loaded[0][0]) if len(h)][:512]
    max_lens = [int(m.architecture["max_len"]) for m, _ in loaded]
    rows = []
    for threads, visit_runs in SETTINGS:
        sessions = [ort_session(folder / "model.onnx", threads) for _, folder in loaded]
        lat = measure_latency(
            sessions, max_lens, histories, [1, 64], REPEATS, visit_runs=visit_runs
        )
        floor = [_one_item_p50_ms(session, histories) for session in sessions]
        for ref, result, fl in zip(args.models, lat, floor, strict=True):
            rows.append(
                {
                    "model": ref,
                    "threads": threads,
                    "visit_runs": visit_runs,
                    "p50_ms": {b: result[b].p50_ms for b in result},
                    "p99_ms": {b: result[b].p99_ms for b in result},
                    "speedup": {b: lat[0][b].p50_ms / result[b].p50_ms for b in result},
                    "one_item_p50_ms": fl,
                }
            )
        print(threads, visit_runs, [round(r[1].p50_ms, 3) for r in lat], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "models": args.models,
        "repeats": REPEATS,
        "histories": len(histories),
        "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
    }
    (out / f"{args.stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"Test histories of {args.models[0]}'s data set, padded to each model's context; ONNX "
        f"Runtime CPU, no spinning; p50 ms over {REPEATS[1]} calls at batch 1 and {REPEATS[64]} "
        f"at batch 64; speedup vs {args.models[0]} in the same setting. Warm: visits of 11 "
        f"calls, the first untimed; cold: single calls in rotation. 1-item: a one-item "
        f"history fed unpadded, warm (the graph's per-call floor). {result['date']}.",
        "",
        "| model | threads | timing | p50 ms b=1 | speedup b=1 | p50 ms b=64 | speedup b=64 "
        "| 1-item p50 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['threads']} | {'warm' if r['visit_runs'] > 1 else 'cold'} | "
            f"{r['p50_ms'][1]:.3f} | {r['speedup'][1]:.2f}x | {r['p50_ms'][64]:.2f} | "
            f"{r['speedup'][64]:.2f}x | {r['one_item_p50_ms']:.3f} |"
        )
    (out / f"{args.stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
