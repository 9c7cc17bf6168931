"""8-bit vs 7-bit int8 weights side by side on THIS CPU: score drift, top-10 agreement,
validation NDCG@10 and latency of each INT8 recipe, both ways.

    python benchmarks/int8_saturation.py model_store/models/ml1m-teacher-windows/1 \
        --out benchmarks/results/int8-saturation

Without VNNI, ONNX Runtime's u8 x s8 kernels add two products into an int16 and can saturate
(`compression/quantize/cpu_int8.py`); 7-bit weights (`reduce_range`) cannot. Reads the stored
`model.onnx` and manifest, never writes to the store. Latency: median of `--runs` warm calls,
`--threads` intra-op threads, random full-window histories. Agreement and the largest score
change against fp32 on `--compare` validation histories; NDCG@10 on `--users` validation
users (seeded sample), full ranking, history masked.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from quantize_check import latency_ms

from compression.data.sequences import leave_one_out
from compression.evaluate.onnx_scoring import compare_outputs, ndcg_evaluator
from compression.pipeline import load_model_data
from compression.quantize.cpu_int8 import int8_needs_reduce_range
from compression.quantize.int8 import QuantizeConfig, quantize_dynamic_int8, quantize_static_int8
from compression.quantize.item_matrix import quantize_item_matrix
from model_store.manifest import load_manifest

COLUMNS = (
    "recipe",
    "row_bits",
    "weight_bits",
    "max_abs_diff",
    "top10_agreement",
    "ndcg@10",
    "ms_b1",
    "ms_b64",
)


def write_table(out: Path, setup: dict[str, object], rows: list[dict[str, object]]) -> str:
    """`int8-saturation.md` from the measured rows; returns its text."""
    lines = [f"Setup: {json.dumps(setup)}", "", "| " + " | ".join(COLUMNS) + " |"]
    lines.append("|---" * len(COLUMNS) + "|")
    for r in rows:
        cells = ["-" if r.get(k) is None else r[k] for k in COLUMNS]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    text = "\n".join(lines) + "\n"
    (out / "int8-saturation.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--compare", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    manifest = load_manifest(args.model_dir / "manifest.json")
    max_len, n_items = int(manifest.architecture["max_len"]), int(manifest.architecture["n_items"])
    src = args.model_dir / "model.onnx"
    split = leave_one_out(load_model_data(manifest))
    valid_hist, _ = split.eval_inputs("valid")
    n_compare = min(args.compare, len(valid_hist))
    pick = np.random.default_rng(0).choice(len(valid_hist), n_compare, replace=False)
    compare_hist = [valid_hist[i] for i in sorted(pick)]
    evaluate = ndcg_evaluator(split, max_len, users=args.users)

    def rows(bits: int) -> Callable[[Path], object]:
        return lambda dst: quantize_item_matrix(src, dst, "int8", bits == 7)

    def dynamic(bits: int, on: Path | None = None) -> Callable[[Path], object]:
        cfg = QuantizeConfig(reduce_range=bits == 7)
        return lambda dst: quantize_dynamic_int8(on or src, dst, cfg)

    def static(bits: int) -> Callable[[Path], object]:
        cfg = QuantizeConfig(mode="static", reduce_range=bits == 7)
        return lambda dst: quantize_static_int8(src, dst, cfg, split.train, max_len)

    def rows_then_dynamic(row_bits: int, bits: int) -> Callable[[Path], object]:
        def build(dst: Path) -> object:
            mid = dst.with_name(f"{dst.stem}-rows.onnx")
            rows(row_bits)(mid)
            return dynamic(bits, mid)(dst)

        return build

    # (recipe, item-row bits, block-weight bits): each recipe both ways, and the published
    # "int8 rows + dynamic" variant with the rows' and the blocks' bits chosen separately
    variants: list[tuple[str, int | None, int | None, Callable[[Path], object]]] = [
        ("item-matrix-int8", 8, None, rows(8)),
        ("item-matrix-int8", 7, None, rows(7)),
        ("dynamic", None, 8, dynamic(8)),
        ("dynamic", None, 7, dynamic(7)),
        ("static-minmax", None, 8, static(8)),
        ("static-minmax", None, 7, static(7)),
        ("item-matrix+dynamic", 8, 8, rows_then_dynamic(8, 8)),
        ("item-matrix+dynamic", 7, 8, rows_then_dynamic(7, 8)),
        ("item-matrix+dynamic", 7, 7, rows_then_dynamic(7, 7)),
    ]
    rows_out: list[dict[str, object]] = [{"recipe": "fp32", "ndcg@10": round(evaluate(src), 4)}]
    with tempfile.TemporaryDirectory(prefix="int8-saturation-") as tmp:
        for i, (name, row_bits, bits, build) in enumerate(variants):
            dst = Path(tmp) / f"{i}.onnx"
            build(dst)
            cmp = compare_outputs(src, dst, compare_hist, max_len)
            row: dict[str, object] = {
                "recipe": name,
                "row_bits": row_bits,
                "weight_bits": bits,
                "max_abs_diff": float(f"{cmp.max_abs_diff:.3g}"),
                "top10_agreement": round(cmp.top10_agreement, 4),
                "ndcg@10": round(evaluate(dst), 4),
            }
            for batch in (1, 64):
                ms = latency_ms(dst, batch, max_len, n_items, args.runs, args.threads)
                row[f"ms_b{batch}"] = round(ms, 3)
            rows_out.append(row)
            print(row, flush=True)

    setup = {
        "model": f"{manifest.name}@{manifest.version}",
        "dataset": manifest.dataset.name,
        "cpu_needs_reduce_range": int8_needs_reduce_range(),
        "machine": platform.machine(),
        "validation_users": args.users,
        "compared_histories": len(compare_hist),
        "threads": args.threads,
        "runs": args.runs,
        "window": max_len,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "int8-saturation.json").write_text(
        json.dumps({"setup": setup, "rows": rows_out}, indent=2)
    )
    print(write_table(args.out, setup, rows_out))


if __name__ == "__main__":
    main()
