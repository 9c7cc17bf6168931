"""Two-stage scorers from 10k to 5M items: latency, ANN recall, memory, index build time.

    python benchmarks/scorer_scale.py --sizes 10000 100000 1000000 5000000 \
        --out benchmarks/results/scorer-scale

The serving half of issue 25's catalogue benchmark (no training: seeded synthetic matrices).
Per size, d = 64: the item matrix as fp32 and as int8 (written with `model_store.two_stage`,
read back memory-mapped as the service does), then for the exact scorers and each ANN index
(FAISS HNSW and IVF, built at publish time over the int8 rows as stored) at a few search
settings: p50/p99 of one call at batch 1, the cost per request at batch 64, recall@10 against
the exact int8 scorer, the bytes each variant holds and the RSS it added. Every request
excludes a 50-item history. One thread everywhere (ONNX Runtime, FAISS, BLAS); index builds
use `--build-threads`. `--http N` also starts the service (`recsys serve`) on an N-item store
and measures real HTTP requests with `wrk` (concurrency 1 and 64).

Data: items around tastes (n / 1000 clusters, at least 100), each user near one taste
("clustered", what a user vector made from a focused history looks like), or plain Gaussian
items and users ("random": no structure at all, the worst case for an ANN index).
"""

# ruff: noqa: E402  (the thread variables must be set before numpy is imported)
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy loads its BLAS: one thread, as measured

import argparse
import gc
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from app.ann_scorer import AnnScorer
from app.exact_scorer import ExactScorer
from model_store.ann_index import build_index, read_index, write_index
from model_store.item_matrix import open_item_matrix
from model_store.manifest import HnswParams, IvfParams
from model_store.two_stage import write_two_stage

RESULTS = Path(__file__).resolve().parent / "results"
K = 10
HISTORY = 50


def items_and_users(n: int, dim: int, n_users: int, data: str, seed: int) -> tuple[Any, Any]:
    rng = np.random.default_rng(seed)
    if data == "random":
        items = rng.standard_normal((n + 1, dim), dtype=np.float32)
        users = rng.standard_normal((n_users, dim), dtype=np.float32)
    else:
        centers = rng.standard_normal((max(100, n // 1000), dim), dtype=np.float32)
        items = np.empty((n + 1, dim), dtype=np.float32)
        for s in range(0, n + 1, 1 << 20):  # in chunks: 5M rows without a second copy
            e = min(n + 1, s + (1 << 20))
            items[s:e] = centers[rng.integers(0, len(centers), e - s)]
            items[s:e] += 0.5 * rng.standard_normal((e - s, dim), dtype=np.float32)
        users = centers[rng.integers(0, len(centers), n_users)]
        users = users + 0.3 * rng.standard_normal((n_users, dim), dtype=np.float32)
    items[0] = 0
    return items, users.astype(np.float32)


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def timed(scorer: Any, users: np.ndarray, exclude: list, batch: int, calls: int) -> list[float]:
    out = []
    for c in range(calls):
        rows = [(c * batch + i) % len(users) for i in range(batch)]
        started = time.perf_counter()
        scorer.top_k(users[rows], [exclude[r] for r in rows], K)
        out.append(time.perf_counter() - started)
    return out


def measure(scorer: Any, users: np.ndarray, exclude: list, calls_b1: int) -> dict[str, Any]:
    scorer.top_k(users[:1], exclude[:1], K)  # warm: first touch of mapped pages, ORT shapes
    scorer.top_k(users[:64], exclude[:64], K)
    b1 = np.array(timed(scorer, users, exclude, 1, calls_b1)) * 1e3
    b64 = np.array(timed(scorer, users, exclude, 64, max(3, calls_b1 // 40))) * 1e3
    return {
        "p50_ms_b1": float(np.percentile(b1, 50)),
        "p99_ms_b1": float(np.percentile(b1, 99)),
        "per_request_ms_b64": float(np.median(b64) / 64),
        "p99_ms_b64_call": float(np.percentile(b64, 99)),
        "calls_b1": len(b1),
        "calls_b64": len(b64),
    }


def recall(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / K for a, b in zip(got, want, strict=True)]))


def index_specs(n: int, args: argparse.Namespace) -> list[tuple[Any, list[dict[str, int]]]]:
    """(build params, search settings to sweep) per index type."""
    nlist = int(4 * np.sqrt(n))
    specs: list[tuple[Any, list[dict[str, int]]]] = []
    if "ivf" in args.indexes:
        specs.append((IvfParams(type="ivf", nlist=nlist, nprobe=16, encoding="sq8"),
                      [{"nprobe": p} for p in (8, 16, 32, 64)]))  # fmt: skip
    if "hnsw" in args.indexes and n <= args.hnsw_max:
        specs.append((HnswParams(type="hnsw", m=32, ef_construction=100, ef_search=64),
                      [{"ef_search": e} for e in (32, 64, 128, 256)]))  # fmt: skip
    return specs


def bench_size(n: int, args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    items, users = items_and_users(n, args.dim, args.users, args.data, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    exclude = [rng.integers(1, n + 1, HISTORY) for _ in range(len(users))]
    calls = args.calls if n <= 1_000_000 else max(40, args.calls // 4)
    base = {"n_items": n, "dim": args.dim, "data": args.data}
    exact_ids = None
    for precision in ("int8", "fp32"):
        folder = work / f"{n}-{precision}"
        started = time.perf_counter()
        written = write_two_stage(folder, items, precision=precision)  # type: ignore[arg-type]
        write_s = time.perf_counter() - started
        gc.collect()
        rss0 = rss_bytes()
        matrix = open_item_matrix(folder, written.scorer, n)
        scorer = ExactScorer(matrix, threads=1)
        row = {**base, "scorer": f"exact-{precision}", "write_s": write_s,
               **measure(scorer, users, exclude, calls)}  # fmt: skip
        row["variant_bytes"] = matrix.nbytes + scorer.nbytes
        row["rss_added_bytes"] = rss_bytes() - rss0
        if precision == "int8":
            exact_ids = scorer.top_k(users, exclude, K)[1]
            int8 = (folder, written, scorer)
        rows.append(row)
        print(json.dumps(row), flush=True)
    del items
    folder, written, exact = int8
    for params, sweep in index_specs(n, args):
        # What `write_two_stage` does for an index: the rows as stored (int8 dequantized).
        vectors = exact.matrix.rows(np.arange(1, n + 1))
        started = time.perf_counter()
        built = build_index(vectors, params, threads=args.build_threads, seed=args.seed)
        build_s = time.perf_counter() - started
        index_file = folder / f"{params.type}.faiss"
        write_index(built, index_file)
        del built, vectors
        gc.collect()
        rss0 = rss_bytes()
        index = read_index(index_file, params, args.dim, n)
        for setting in sweep:
            ann = AnnScorer(index, params.model_copy(update=setting), exact, threads=1)
            row = {**base, "scorer": f"ann-{params.type}-int8", **setting,
                   "index_build_s": build_s, "build_threads": args.build_threads,
                   **measure(ann, users, exclude, calls)}  # fmt: skip
            row["recall@10"] = recall(ann.top_k(users, exclude, K)[1], exact_ids)
            row["index_bytes"] = index_file.stat().st_size
            row["variant_bytes"] = exact.matrix.nbytes + exact.nbytes + row["index_bytes"]
            row["rss_added_bytes"] = rss_bytes() - rss0
            rows.append(row)
            print(json.dumps(row), flush=True)
        del index, ann
    return rows


def http_benchmark(n: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """`recsys serve` on an n-item store (exact int8 and, if built, IVF), wrk at c1 and c64."""
    from benchmarks.serving.bench import run_wrk
    from model_store import ModelStore
    from model_store.two_stage import publish_two_stage

    store = ModelStore(work / f"store-{n}")
    items, _ = items_and_users(n, args.dim, 1, args.data, args.seed)
    onnx_path = user_model(work / "user.onnx", args.dim, args.seed)
    item_ids = work / "items.json"
    item_ids.write_text(json.dumps({"format": "recsys-item-mapping/1",
                                    "item_ids": [f"SKU-{i}" for i in range(n)]}))  # fmt: skip
    meta = {"kind": "two-stage", "parent": None, "architecture": {"max_len": 50},
            "recipe": {}, "metrics": {},
            "dataset": {"name": "synthetic", "sha256": "0" * 64, "n_users": 1, "n_items": n,
                        "n_interactions": 1}}  # fmt: skip
    started = time.perf_counter()
    publish_two_stage(store, "exact", user_model=onnx_path, item_ids=item_ids,
                      item_matrix=items, **meta)  # type: ignore[arg-type]  # fmt: skip
    publish_s = {"exact": time.perf_counter() - started}
    variants = ["exact=exact@latest"]
    if n <= args.http_index_max:
        nlist = int(4 * np.sqrt(n))
        started = time.perf_counter()
        publish_two_stage(store, "ann", user_model=onnx_path, item_ids=item_ids, item_matrix=items,
                          index={"type": "ivf", "nlist": nlist, "nprobe": args.http_nprobe,
                                 "encoding": "sq8"}, threads=args.build_threads, **meta)  # type: ignore[arg-type]  # fmt: skip
        publish_s["ann"] = time.perf_counter() - started
        variants.append("ann=ann@latest")
    del items
    rng = np.random.default_rng(args.seed)
    out: dict[str, Any] = {"n_items": n, "publish_s": publish_s, "variants": {}}
    for spec in variants:
        name = spec.split("=")[0]
        bodies = work / f"bodies-{name}.jsonl"
        with bodies.open("w") as f:
            for _ in range(2000):
                history = [f"SKU-{i}" for i in rng.integers(0, n, HISTORY)]
                body = {"user_id": "u", "history": history, "k": K, "variant": name}
                f.write(json.dumps(body) + "\n")
        port = 8765
        env = {**os.environ, "RECSYS_LOG_LEVEL": "warning"}
        cmd = ["taskset", "-c", "0", "python", "-m", "recsys_cli.main", "serve", "--store",
               str(store.root), "--port", str(port), "--variant", spec]  # fmt: skip
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_until_ready(port, proc)
            start_s = time.perf_counter() - started
            c1 = run_wrk(port, bodies, 1, args.http_seconds)
            c64 = run_wrk(port, bodies, 64, args.http_seconds)
            summary = json.loads(fetch(f"http://127.0.0.1:{port}/v1/variants"))["variants"][name]
            out["variants"][name] = {
                "start_to_ready_s": start_s,
                "c1": {k: c1[k] for k in ("rps", "p50_us", "p99_us", "errors")},
                "c64": {k: c64[k] for k in ("rps", "p50_us", "p99_us", "errors")},
                "memory_bytes": summary["memory_bytes"],
                "memory": summary["memory"],
                "ranking": summary["ranking"],
                "rss_bytes": proc_rss(proc.pid),
            }
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        print(json.dumps({name: out["variants"][name]}), flush=True)
    return out


def user_model(path: Path, dim: int, seed: int) -> Path:
    """A small user model: mean of hashed item embeddings (4,096 rows), so the service's
    memory is the scorer's, not a catalogue-sized embedding table's."""
    from onnx import TensorProto, helper, numpy_helper

    table = np.random.default_rng(seed).standard_normal((4096, dim)).astype(np.float32)
    table[0] = 0
    nodes = [
        helper.make_node("Mod", ["item_ids", "rows"], ["hashed"]),
        helper.make_node("Gather", ["table", "hashed"], ["emb"]),
        helper.make_node("ReduceMean", ["emb", "axis1"], ["user_vector"], keepdims=0),
    ]
    inits = [numpy_helper.from_array(table, "table"),
             numpy_helper.from_array(np.array(4096, dtype=np.int64), "rows"),
             numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1")]  # fmt: skip
    graph = helper.make_graph(
        nodes, "user", [helper.make_tensor_value_info("item_ids", TensorProto.INT64, ["b", "l"])],
        [helper.make_tensor_value_info("user_vector", TensorProto.FLOAT, ["b", dim])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def fetch(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def wait_until_ready(port: int, proc: subprocess.Popen, timeout_s: float = 900) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        if proc.poll() is not None:
            raise SystemExit(f"service exited: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        try:
            if json.loads(fetch(f"http://127.0.0.1:{port}/readyz")).get("status") == "ready":
                return time.perf_counter() - started
        except Exception:
            pass
        time.sleep(0.5)
    raise SystemExit(f"service not ready within {timeout_s} s")


def proc_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def markdown(rows: list[dict[str, Any]], http: list[dict[str, Any]], meta: dict) -> str:
    lines = [
        f"# Two-stage scorer scale ({meta['date']}, {meta['cpu']})",
        "",
        f"d = {meta['dim']}, data {meta['data']}, k = {K}, {HISTORY}-item history excluded per "
        "request, one thread (ONNX Runtime, FAISS, BLAS); the JSON's `meta` holds the command.",
        "",
        "| items | scorer | setting | p50 ms b=1 | p99 ms b=1 | ms/request b=64 | recall@10 "
        "| variant MB | RSS added MB | build s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        setting = next((f"{k}={r[k]}" for k in ("nprobe", "ef_search") if k in r), "-")
        build = r.get("index_build_s")
        lines.append(
            f"| {r['n_items']:,} | {r['scorer']} | {setting} | {r['p50_ms_b1']:.2f} "
            f"| {r['p99_ms_b1']:.2f} | {r['per_request_ms_b64']:.3f} "
            f"| {r.get('recall@10', 1.0):.4f} | {r['variant_bytes'] / 1e6:.1f} "
            f"| {r['rss_added_bytes'] / 1e6:.1f} | {'-' if build is None else f'{build:.1f}'} |"
        )
    for h in http:
        lines += [
            "",
            f"HTTP, {h['n_items']:,} items (`recsys serve`, wrk on the other core):",
            "",
            "| variant | ready s | c1 p50 ms | c1 p99 ms | c64 req/s | c64 p99 ms "
            "| memory MB (/v1/variants) | RSS MB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, v in h["variants"].items():
            lines.append(
                f"| {name} ({v['ranking']}) | {v['start_to_ready_s']:.1f} "
                f"| {v['c1']['p50_us'] / 1e3:.2f} | {v['c1']['p99_us'] / 1e3:.2f} "
                f"| {v['c64']['rps']:.0f} | {v['c64']['p99_us'] / 1e3:.1f} "
                f"| {v['memory_bytes'] / 1e6:.1f} | {v['rss_bytes'] / 1e6:.1f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--data", choices=["clustered", "random"], default="clustered")
    p.add_argument("--users", type=int, default=1000, help="distinct user vectors")
    p.add_argument("--calls", type=int, default=400, help="batch-1 calls (fewer above 1M)")
    p.add_argument("--indexes", nargs="*", default=["ivf", "hnsw"])
    p.add_argument("--hnsw-max", type=int, default=1_000_000, help="largest HNSW build")
    p.add_argument("--build-threads", type=int, default=2)
    p.add_argument("--http", type=int, nargs="*", default=[], help="sizes to serve over HTTP")
    p.add_argument("--http-index-max", type=int, default=1_000_000)
    p.add_argument("--http-nprobe", type=int, default=16)
    p.add_argument("--http-seconds", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=Path("/tmp/scorer-scale"))
    p.add_argument("--out", type=Path, default=RESULTS / "scorer-scale")
    p.add_argument("--render", type=Path, help="only rewrite the markdown of this JSON")
    args = p.parse_args()
    if args.render:
        done = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(
            markdown(done["rows"], done["http"], done["meta"])
        )
        return
    args.work.mkdir(parents=True, exist_ok=True)
    cpu = next((line.split(":", 1)[1].strip() for line in
                subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                if line.startswith("Model name")), platform.processor())  # fmt: skip
    meta = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu, "dim": args.dim, "data": args.data,
            "command": " ".join(sys.argv), "python": platform.python_version()}  # fmt: skip
    rows = [r for n in args.sizes for r in bench_size(n, args, args.work)]
    http = [http_benchmark(n, args, args.work) for n in args.http]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "rows": rows, "http": http}
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(rows, http, meta))
    print(markdown(rows, http, meta))


if __name__ == "__main__":
    main()
