"""The headline table over seeds: mean ± sd of each row's test metrics, from the store.

Each seed is a family: `<teacher>-s<seed>`, `<student>-s<seed>` distilled from it,
`<student>-s<seed>-int8` (item rows + dynamic INT8), `<student>-s<seed>-int4` (4-bit weights,
post-training), `<student>-s<seed>-qat-int4` (4-bit after fake-quant fine-tuning) and
`<teacher>-s<seed>-int8-ctx50` (the teacher's INT8 reading its last 50 items).
Retention and the share of the teacher's bytes are per seed, against that seed's own
teacher, then averaged. Rows whose models are missing are reported as missing.

    python benchmarks/headline.py --store /path/to/models --seeds 0 1 2 \
        --teacher ml1m-teacher --student ml1m-student --out benchmarks/results/headline-ml1m

Writes headline.json and headline.md under --out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tables import mean_sd, write_results

from model_store.store import ModelStore, StoreError

METRICS = ("test_ndcg@10", "test_hr@10", "test_ndcg@20", "test_hr@20")


def _latest(store: ModelStore, name: str) -> dict | None:
    try:
        manifest, _ = store.resolve(f"{name}@latest")
    except StoreError:
        return None
    onnx = manifest.artifacts.get("model.onnx")
    return {
        "ref": f"{manifest.name}@{manifest.version}",
        "params": manifest.metrics.get("params"),
        "onnx_bytes": onnx.size_bytes if onnx else None,
        "epochs": manifest.metrics.get("epochs"),
        **{k: manifest.metrics[k] for k in METRICS if k in manifest.metrics},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--teacher", default="ml1m-teacher")
    parser.add_argument("--student", default="ml1m-student")
    parser.add_argument("--out", default="benchmarks/results/headline-ml1m")
    args = parser.parse_args()
    store = ModelStore(Path(args.store))
    students = {"student": "", "student INT8": "-int8", "student INT4": "-int4",
                "student INT4 (QAT)": "-qat-int4"}  # fmt: skip
    labels = ("teacher", *students, "50-item INT8 teacher")
    per_seed: dict[str, list[dict]] = {label: [] for label in labels}
    for seed in args.seeds:
        teacher = _latest(store, f"{args.teacher}-s{seed}")
        found_rows = [("teacher", teacher)] + [
            (label, _latest(store, f"{args.student}-s{seed}{suffix}"))
            for label, suffix in students.items()
        ]
        found_rows.append(
            ("50-item INT8 teacher", _latest(store, f"{args.teacher}-s{seed}-int8-ctx50"))
        )
        for label, found in found_rows:
            if found is None:
                continue
            if teacher is not None and "test_ndcg@10" in found:
                found["retention"] = found["test_ndcg@10"] / teacher["test_ndcg@10"]
                if found["onnx_bytes"] and teacher["onnx_bytes"]:
                    found["bytes_share"] = found["onnx_bytes"] / teacher["onnx_bytes"]
            per_seed[label].append({"seed": seed, **found})
    summary = {
        label: {
            key: mean_sd([r[key] for r in runs])
            for key in (*METRICS, "retention", "bytes_share")
            if runs and all(key in r for r in runs)
        }
        | {"models": [r["ref"] for r in runs], "params": runs[0]["params"] if runs else None,
           "onnx_bytes": runs[0]["onnx_bytes"] if runs else None}
        for label, runs in per_seed.items()
    }  # fmt: skip
    payload = {"per_seed": per_seed, "summary": summary}
    lines = [
        "| model | seeds | params | ONNX bytes (of teacher) | NDCG@10 | HR@10 | retention |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, s in summary.items():
        if not s["models"]:
            lines.append(f"| {label} | missing | | | | | |")
            continue
        share = f" (1/{1 / s['bytes_share']['mean']:.1f})" if "bytes_share" in s else ""

        def cell(key: str, fmt: str = ".4f", s: dict = s) -> str:
            if key not in s:
                return "-"
            m = s[key]
            return f"{m['mean']:{fmt}} ± {m['sd']:{fmt}}"

        lines.append(
            f"| {label} | {len(s['models'])} | {s['params']:,.0f} | {s['onnx_bytes']:,}{share} "
            f"| {cell('test_ndcg@10')} | {cell('test_hr@10')} | {cell('retention', '.1%')} |"
        )
    write_results(args.out, "headline", payload, lines)


if __name__ == "__main__":
    main()
