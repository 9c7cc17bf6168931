"""What the hand-written ONNX graph (`compression/export/graph.py`) is worth against PyTorch's
exporter, on stored models: each model is exported both ways, checked against PyTorch, made
into its fastest >= 97% variant the same way the ML-1M recipe does (item matrix int8 per row,
dynamic INT8, the most recent `--context` items), evaluated (test set, full ranking, history
masked) and timed side by side in one run with the comparison report's protocol (ONNX
Runtime CPU, 1 intra-op thread, visits of 11 calls with the first untimed).

Usage: python benchmarks/graph_writer.py NAME@V [NAME@V ...] [--store DIR] [--context 50]
       [--out DIR] [--stem NAME]
Writes <out>/<stem>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import onnx

from compression.data.sequences import leave_one_out, pad_left
from compression.evaluate.metrics import evaluate_scorer, top_k_agreement
from compression.evaluate.onnx_scoring import onnx_scorer
from compression.export.compact import compact_file
from compression.export.exporter import check_parity, export_onnx
from compression.model.train import load_checkpoint
from compression.pipeline import load_model_data
from compression.quantize.int8 import quantize_dynamic_int8
from compression.quantize.item_matrix import quantize_item_matrix
from compression.report.compare import measure_latency
from model_store.runtime import ort_session
from model_store.store import CHECKPOINT_FILE, ModelStore

WRITERS = ("torch", "graph")
REPEATS = {1: 200, 64: 50}


def _optimized_nodes(path: Path, work: Path) -> int:
    """Nodes left after ONNX Runtime's own graph optimizations (what runs per call)."""
    optimized = work / f"{path.stem}.opt.onnx"
    ort_session(path, threads=None, optimized_model_path=optimized)
    return len(onnx.load(str(optimized)).graph.node)


def _variants(ref: str, model: Any, work: Path, context: int, histories: list) -> list[dict]:
    rows = []
    for writer in WRITERS:
        fp32 = work / f"{writer}-fp32.onnx"
        export_onnx(model, fp32, writer=writer)
        parity = check_parity(model, fp32, histories[:512])
        rows_path, fast = work / f"{writer}-rows.onnx", work / f"{writer}-int8-rows-ctx.onnx"
        quantize_item_matrix(fp32, rows_path)
        quantize_dynamic_int8(rows_path, fast)
        compact_file(fast, max_len=context)
        for kind, path in (("fp32", fp32), (f"int8-rows-ctx{context}", fast)):
            rows.append(
                {
                    "model": ref,
                    "writer": writer,
                    "variant": kind,
                    "path": path,
                    "max_len": context if kind != "fp32" else model.cfg.max_len,
                    "nodes": len(onnx.load(str(path)).graph.node),
                    "nodes_after_ort": _optimized_nodes(path, work),
                    "bytes": path.stat().st_size,
                    **({"parity_max_abs_diff": parity.max_abs_diff} if kind == "fp32" else {}),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("models", nargs="+", help="NAME@VERSION of stored models with a checkpoint")
    parser.add_argument("--store", default=os.environ.get("RECSYS_STORE", "model_store/models"))
    parser.add_argument("--context", type=int, default=50)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--stem", default="graph-writer")
    args = parser.parse_args()
    store = ModelStore(Path(args.store))
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="graph-writer-") as tmp:
        for ref in args.models:
            manifest, folder = store.load(ref)
            split = leave_one_out(load_model_data(manifest))
            histories = split.eval_inputs("test")[0]
            work = Path(tmp) / ref.replace("@", "_")
            work.mkdir()
            model = load_checkpoint(folder / CHECKPOINT_FILE)
            found = _variants(ref, model, work, args.context, histories)
            for row in found:
                scorer = onnx_scorer(row["path"], 1)
                metrics = evaluate_scorer(scorer, split, "test", model.cfg.max_len)
                row["ndcg@10"], row["hr@10"] = metrics["ndcg@10"], metrics["hr@10"]
                print(ref, row["writer"], row["variant"], f"{row['ndcg@10']:.4f}", flush=True)
            # the two writers' variants rank alike (same weights, same quantizer)
            sample = pad_left(histories[:512], model.cfg.max_len)
            outs = [onnx_scorer(r["path"], 1)(sample) for r in found if r["variant"] != "fp32"]
            for r in found:
                if r["variant"] != "fp32":
                    r["top10_agreement_between_writers"] = top_k_agreement(outs[0], outs[1])
            # one model's four graphs side by side, on its own data set's histories
            timed = [h for h in histories if len(h)][:512]
            sessions = [ort_session(r["path"], 1) for r in found]
            lat = measure_latency(sessions, [r["max_len"] for r in found], timed, [1, 64], REPEATS)
            for row, result in zip(found, lat, strict=True):
                row.pop("path")
                row["p50_ms"] = {b: result[b].p50_ms for b in result}
                row["p99_ms"] = {b: result[b].p99_ms for b in result}
            rows += found
    for row in rows:  # speedups vs the same model's fp32 graph from each writer
        ref_rows = {
            r["writer"]: r for r in rows if r["model"] == row["model"] and r["variant"] == "fp32"
        }
        row["speedup_vs_torch_fp32"] = {
            b: ref_rows["torch"]["p50_ms"][b] / row["p50_ms"][b] for b in row["p50_ms"]
        }
        row["speedup_vs_same_writer_fp32"] = {
            b: ref_rows[row["writer"]]["p50_ms"][b] / row["p50_ms"][b] for b in row["p50_ms"]
        }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "models": args.models,
        "context": args.context,
        "repeats": REPEATS,
        "threads": 1,
        "visit_runs": 11,
        "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
    }
    (out / f"{args.stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"Each model exported by PyTorch's exporter (`torch`) and by `compression/export/graph.py` "
        f"(`graph`); its int8-rows-ctx{args.context} variant made from each the same way. "
        f"Quality: test set, full ranking, history masked. Latency: ONNX Runtime CPU, 1 "
        f"intra-op thread, visits of 11 calls (first untimed), p50 over {REPEATS[1]} calls at "
        f"batch 1 and {REPEATS[64]} at batch 64, one model's rows in one run. {result['date']}.",
        "",
        "| model | writer | variant | nodes (after ORT) | NDCG@10 | p50 ms b=1 | p50 ms b=64 "
        "| vs torch fp32 b=1 / b=64 | vs same writer's fp32 b=1 / b=64 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s, w = r["speedup_vs_torch_fp32"], r["speedup_vs_same_writer_fp32"]
        lines.append(
            f"| {r['model']} | {r['writer']} | {r['variant']} "
            f"| {r['nodes']} ({r['nodes_after_ort']}) "
            f"| {r['ndcg@10']:.4f} | {r['p50_ms'][1]:.3f} | {r['p50_ms'][64]:.2f} "
            f"| {s[1]:.2f}x / {s[64]:.2f}x | {w[1]:.2f}x / {w[64]:.2f}x |"
        )
    (out / f"{args.stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
