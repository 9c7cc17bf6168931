"""Batch-1 latency of a stored variant's engine alone (mapping, inference, mask and top-k,
no HTTP, no batcher), on the same request bodies as `bench.py`, one ONNX Runtime thread.

    python -m benchmarks.serving.engine_latency --store /tmp/benchstore \
        --model ml1m-bench-int8@1 --data ../shared/data/ml-1m/ml-1m.txt

The HTTP benchmarks compare the service's p50 at concurrency 1 with the bare FastAPI p50
plus this number: what the service adds on top of its model and an empty endpoint.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from app.model import LoadedModel, Query
from benchmarks.serving.bench import write_bodies
from model_store import ModelStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    bodies = Path("/tmp/engine-latency-bodies.jsonl")
    write_bodies(args.data, bodies, args.users, seed=0)  # the bodies bench.py sends
    buckets = [16, 32, 64, 128, 200]  # the service's default length buckets
    model = LoadedModel(ModelStore(args.store), args.model, "onnxruntime", 1, buckets)
    model.warm_up(32)
    histories = [json.loads(line)["history"] for line in bodies.read_text().splitlines()]
    times = []
    for _ in range(args.repeats):
        for history in histories:
            started = time.perf_counter()
            known, _ = model.map_history(history)
            model.run_batch([Query(known[-model.max_len :], known, 10)])
            times.append(time.perf_counter() - started)
    times.sort()
    out = {
        "model": model.ref,
        "calls": len(times),
        "p50_ms": statistics.median(times) * 1e3,
        "p99_ms": times[int(0.99 * len(times))] * 1e3,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
