"""Build every INT8/FP16 variant of a stored model and measure bytes, CPU latency and quality.

    python benchmarks/quantize_check.py model_store/models/beauty-teacher-d03/1 --users 5000

Reads the stored `model.onnx` and manifest (never writes to the store); variants go to a
temporary folder. Latency: ONNX Runtime CPU, `--threads` intra-op threads, random full-window
histories, median of `--runs` calls after 5 warm-up calls. Quality: top-10 agreement with the
fp32 file on validation histories, and validation NDCG@10 on a seeded user subsample (needs the
model's data set, e.g. ../shared/data; skipped with --no-ndcg).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from compression.data.sequences import leave_one_out
from compression.evaluate.onnx_scoring import compare_outputs, ndcg_evaluator
from compression.export.files import file_size_bytes
from compression.pipeline import load_model_data
from compression.quantize.adaptive import adaptive_quantize
from compression.quantize.fp16 import convert_fp16
from compression.quantize.int8 import QuantizeConfig, quantize_dynamic_int8, quantize_static_int8
from compression.quantize.item_matrix import quantize_item_matrix
from model_store.manifest import load_manifest
from model_store.runtime import ort_session


def latency_ms(path: Path, batch: int, length: int, n_items: int, runs: int, threads: int) -> float:
    session = ort_session(path, threads)
    ids = np.random.default_rng(0).integers(1, n_items + 1, (batch, length)).astype(np.int64)
    feed = {"item_ids": ids}
    for _ in range(5):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--users", type=int, default=5000, help="validation users for NDCG")
    parser.add_argument("--compare", type=int, default=2000, help="histories for agreement")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-ndcg", action="store_true")
    parser.add_argument("--adaptive", action="store_true", help="also run adaptive dynamic")
    parser.add_argument("--json", type=Path, help="write the rows here as JSON")
    args = parser.parse_args()

    manifest = load_manifest(args.model_dir / "manifest.json")
    arch = manifest.architecture
    max_len, n_items = int(arch["max_len"]), int(arch["n_items"])
    src = args.model_dir / "model.onnx"
    split = leave_one_out(load_model_data(manifest))
    valid_hist, _ = split.eval_inputs("valid")
    rng = np.random.default_rng(0)
    pick = rng.choice(len(valid_hist), size=min(args.compare, len(valid_hist)), replace=False)
    compare_hist = [valid_hist[i] for i in sorted(pick)]
    evaluate = None if args.no_ndcg else ndcg_evaluator(split, max_len, users=args.users)

    rows = []
    with tempfile.TemporaryDirectory(prefix="quantize-check-") as tmp:
        out = Path(tmp)
        build_s: dict[str, float] = {}

        def timed(name: str, fn, *a, **k) -> Path:  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            fn(*a, **k)
            build_s[name] = time.perf_counter() - start
            return out / f"{name}.onnx"

        variants = {"fp32": src}
        variants["dynamic"] = timed("dynamic", quantize_dynamic_int8, src, out / "dynamic.onnx")
        variants["dynamic-per-channel"] = timed(
            "dynamic-per-channel",
            quantize_dynamic_int8,
            src,
            out / "dynamic-per-channel.onnx",
            QuantizeConfig(per_channel=True),
        )
        for method in ("minmax", "entropy"):
            name = f"static-{method}"
            variants[name] = timed(
                name,
                quantize_static_int8,
                src,
                out / f"{name}.onnx",
                QuantizeConfig(mode="static", calibration=method),
                split.train,
                max_len,
            )
        for compute in ("int8", "float"):
            name = f"item-matrix-{compute}"
            variants[name] = timed(name, quantize_item_matrix, src, out / f"{name}.onnx", compute)
        variants["item-matrix+dynamic"] = timed(
            "item-matrix+dynamic",
            quantize_dynamic_int8,
            variants["item-matrix-int8"],
            out / "item-matrix+dynamic.onnx",
        )
        variants["fp16"] = timed("fp16", convert_fp16, src, out / "fp16.onnx")
        adaptive = None
        if args.adaptive and evaluate is not None:
            start = time.perf_counter()
            adaptive = adaptive_quantize(
                src,
                out / "adaptive-dynamic.onnx",
                QuantizeConfig(adaptive=True),
                evaluate,
                valid_hist[:256],
                max_len,
            )
            build_s["adaptive-dynamic"] = time.perf_counter() - start
            variants["adaptive-dynamic"] = adaptive.path

        for name, path in variants.items():
            row: dict[str, object] = {"variant": name, "bytes": file_size_bytes(path)}
            row["build_s"] = round(build_s.get(name, 0.0), 2)
            for batch in (1, 64):
                row[f"ms_b{batch}"] = round(
                    latency_ms(path, batch, max_len, n_items, args.runs, args.threads), 3
                )
            cmp = compare_outputs(src, path, compare_hist, max_len)
            row["top10_agreement"] = round(cmp.top10_agreement, 4)
            row["max_abs_diff"] = float(f"{cmp.max_abs_diff:.3g}")
            if evaluate is not None:
                row["valid_ndcg@10"] = round(evaluate(path), 5)
            rows.append(row)
            print(json.dumps(row), flush=True)

    keys = list(rows[0])
    print("\n| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    if adaptive is not None:
        print("\nadaptive:", json.dumps(adaptive.as_manifest()))
        print("evaluations", adaptive.evaluations, "proxy runs", adaptive.proxy_runs)
        for s in adaptive.sensitivities:
            print(f"  {s.node:40s} rel_mse {s.score_rel_mse:.2e} top10 {s.top10_agreement:.4f}")
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model_dir), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
