"""4-bit weights at each block size, next to the model's fp32 and INT8 files: bytes, validation
NDCG@10 (what a block size is chosen on), test NDCG@10 and top-10 agreement with fp32 on the
test histories. Nothing is published; the int4 files go to a temporary folder.

    python benchmarks/int4_check.py ml1m-student-s0@1 ml1m-student-s1@1 ml1m-student-s2@1 \
        --store /path/to/models --out benchmarks/results/int4-ml1m

Each model's INT8 variant is looked up as `<name>-int8@latest` (skipped when absent).
Writes int4.json (per model) and int4.md (mean ± sd over the models) under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from tables import write_results

from compression.evaluate.metrics import (
    eval_batch_size,
    evaluate_scorer,
    score_all,
    top_k_agreement,
)
from compression.evaluate.onnx_scoring import onnx_scorer
from compression.export.compact import compact_file
from compression.pipeline import model_split
from compression.quantize.int4 import BLOCK_SIZES, quantize_int4
from model_store.store import ModelStore, StoreError

AGREEMENT_USERS = 2000


def measure(path: Path, parent: Path, split: object, max_len: int) -> dict[str, float]:
    batch = eval_batch_size(split.n_items)  # type: ignore[attr-defined]
    valid = evaluate_scorer(onnx_scorer(path), split, "valid", max_len, batch)  # type: ignore[arg-type]
    test = evaluate_scorer(onnx_scorer(path), split, "test", max_len, batch)  # type: ignore[arg-type]
    tests = split.eval_inputs("test")[0][:AGREEMENT_USERS]  # type: ignore[attr-defined]
    agree = top_k_agreement(
        score_all(onnx_scorer(parent), tests, max_len, batch),
        score_all(onnx_scorer(path), tests, max_len, batch),
    )
    return {
        "bytes": float(path.stat().st_size),
        "valid_ndcg@10": valid["ndcg@10"],
        "test_ndcg@10": test["ndcg@10"],
        "test_hr@10": test["hr@10"],
        "top10_agreement": agree,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="stored models with model.onnx: NAME@VERSION")
    parser.add_argument("--store", required=True)
    parser.add_argument("--out", default="benchmarks/results/int4")
    args = parser.parse_args()
    store = ModelStore(Path(args.store))
    options: list[int | None] = [None, *BLOCK_SIZES]
    per_model: dict[str, dict[str, dict[str, float]]] = {}
    for ref in args.models:
        manifest, folder = store.load(ref)
        _, split = model_split(manifest)
        max_len = int(manifest.architecture["max_len"])
        fp32 = folder / "model.onnx"
        rows = {"fp32": measure(fp32, fp32, split, max_len)}
        try:
            _, int8_folder = store.load(f"{manifest.name}-int8@latest")
            rows["int8"] = measure(int8_folder / "model.onnx", fp32, split, max_len)
        except StoreError:
            pass
        with tempfile.TemporaryDirectory() as tmp:
            for block in options:
                dst = Path(tmp) / f"int4-{block}.onnx"
                quantize_int4(fp32, dst, block)
                compact_file(dst)  # as publishing does
                rows[f"int4 {block or 'column'}"] = measure(dst, fp32, split, max_len)
        per_model[ref] = rows
        print(ref, json.dumps(rows, indent=1))
    labels = list(next(iter(per_model.values())))
    lines = [
        f"Means ± sd over {len(per_model)} models: {', '.join(per_model)}.",
        "",
        "| file | bytes | valid NDCG@10 | test NDCG@10 | test HR@10 | top-10 agreement |",
        "|---|---|---|---|---|---|",
    ]
    for label in labels:
        runs = [rows[label] for rows in per_model.values() if label in rows]

        def cell(key: str, runs: list[dict[str, float]] = runs) -> str:
            values = [r[key] for r in runs]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.fmean(values):.4f} ± {sd:.4f}"

        size = statistics.fmean(r["bytes"] for r in runs)
        lines.append(
            f"| {label} | {size:,.0f} | {cell('valid_ndcg@10')} | {cell('test_ndcg@10')} "
            f"| {cell('test_hr@10')} | {cell('top10_agreement')} |"
        )
    write_results(args.out, "int4", per_model, lines)


if __name__ == "__main__":
    main()
