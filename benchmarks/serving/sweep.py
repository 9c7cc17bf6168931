"""Latency against throughput per variant: a closed-loop concurrency sweep with wrk and
open-loop fixed-rate runs with hey (the arrival pattern changes p99 a lot).

    python -m benchmarks.serving.sweep --store model_store/models \
        --data ../shared/data/ml-1m/ml-1m.txt --name load-ml1m \
        --scenario student=service:student=ml1m-student-int8-ctx50@1 \
        --scenario teacher=service:teacher=ml1m-teacher@3 \
        --connections 1,8,32,128 --rates 200,400,800 --duration-s 5

Client numbers come from wrk / hey; the service's own p50/p99 over each run (from its
`/metrics` histograms) stand next to them. Writes JSON, markdown and a PNG (p50 and p99
against achieved throughput, one colour per variant; lines = closed loop, markers = open
loop) under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.serving.bench import (
    RESULTS,
    Scenario,
    run_wrk,
    scrape,
    server_quantiles,
    wait_ready,
    write_bodies,
)


def run_hey(port: int, body: Path, rate: float, duration_s: int, workers: int) -> dict[str, Any]:
    """Fixed offered rate: `workers` senders, each limited to rate / workers per second."""
    with tempfile.NamedTemporaryFile("w+", suffix=".csv") as out:
        cmd = ["hey", "-z", f"{duration_s}s", "-c", str(workers), "-q",
               f"{rate / workers:.3f}", "-m", "POST", "-T", "application/json", "-D",
               str(body), "-o", "csv", f"http://127.0.0.1:{port}/v1/recommend"]  # fmt: skip
        subprocess.run(cmd, stdout=out, check=True, timeout=duration_s + 60)
        out.seek(0)
        rows = list(csv.DictReader(out))
    ok = sorted(float(r["response-time"]) for r in rows if r["status-code"] == "200")
    if not ok:
        return {"offered_rps": rate, "rps": 0.0, "errors": len(rows)}
    q = statistics.quantiles(ok, n=100) if len(ok) > 1 else [ok[0]] * 99
    return {
        "offered_rps": rate,
        "rps": len(ok) / duration_s,
        "p50_ms": statistics.median(ok) * 1e3,
        "p95_ms": q[94] * 1e3,
        "p99_ms": q[98] * 1e3,
        "errors": len(rows) - len(ok),
    }


def plot(results: dict[str, dict[str, list[dict[str, Any]]]], path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5))
    FigureCanvasAgg(fig)
    for ax, key in zip(fig.subplots(1, 2), ("p50_ms", "p99_ms"), strict=True):
        for i, (label, runs) in enumerate(results.items()):
            color = f"C{i}"
            closed = [r for r in runs["closed"] if r.get(key) is not None]
            ax.plot([r["rps"] for r in closed], [r[key] for r in closed], "-o", color=color,
                    label=f"{label} (closed loop)")  # fmt: skip
            opened = [r for r in runs["open"] if r.get(key) is not None]
            ax.plot([r["rps"] for r in opened], [r[key] for r in opened], "s", color=color,
                    mfc="none", label=f"{label} (open loop)")  # fmt: skip
        ax.set_yscale("log")
        ax.set_xlabel("achieved throughput (req/s)")
        ax.set_ylabel(f"client {key.replace('_ms', '')} latency (ms, log)")
        ax.grid(True, alpha=0.3)
    fig.axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--scenario", action="append", required=True, help="LABEL=SPEC")
    parser.add_argument("--connections", default="1,8,32,128")
    parser.add_argument("--rates", default="", help="open-loop offered rates, req/s")
    parser.add_argument("--hey-workers", type=int, default=256)
    parser.add_argument("--duration-s", type=int, default=5)
    parser.add_argument("--name", default="load")
    parser.add_argument("--server-cpus", default="0,1")
    parser.add_argument("--wrk-cpus", default="0,1")
    args = parser.parse_args()
    started = time.monotonic()
    bodies = Path("/tmp") / f"{args.name}-bodies.jsonl"
    write_bodies(args.data, bodies, 2000, seed=0)
    one = Path("/tmp") / f"{args.name}-one.json"
    one.write_text(bodies.read_text().splitlines()[0])
    scenarios = [Scenario(*item.partition("=")[::2], port=8200 + i)  # type: ignore[misc]
                 for i, item in enumerate(args.scenario)]  # fmt: skip
    conns = [int(c) for c in args.connections.split(",")]
    rates = [float(r) for r in args.rates.split(",") if r]
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    try:
        for s in scenarios:
            cmd, env = s.command(args.store)
            log = open(Path("/tmp") / f"{args.name}-{s.label}.log", "w")  # noqa: SIM115
            s.proc = subprocess.Popen(["taskset", "-c", args.server_cpus, *cmd], env=env,
                                      stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)  # fmt: skip
        for s in scenarios:
            wait_ready(s.port, one.read_bytes())
            run_wrk(s.port, bodies, 16, 2, args.wrk_cpus)
            runs: dict[str, list[dict[str, Any]]] = {"closed": [], "open": []}
            for c in conns:
                before = scrape(s.port)
                r = run_wrk(s.port, bodies, c, args.duration_s, args.wrk_cpus)
                r.update(server_quantiles(before, scrape(s.port)))
                r.update(connections=c, p50_ms=r["p50_us"] / 1e3, p95_ms=r["p95_us"] / 1e3,
                         p99_ms=r["p99_us"] / 1e3)  # fmt: skip
                runs["closed"].append(r)
                print(f"{s.label} c={c}: {r['rps']:,.0f} req/s p50 {r['p50_ms']:.1f} "
                      f"p99 {r['p99_ms']:.1f} ms", flush=True)  # fmt: skip
            for rate in rates:
                before = scrape(s.port)
                r = run_hey(s.port, one, rate, args.duration_s, args.hey_workers)
                r.update(server_quantiles(before, scrape(s.port)))
                runs["open"].append(r)
                print(f"{s.label} rate={rate:.0f}: {r['rps']:,.0f} req/s p50 "
                      f"{r.get('p50_ms', 0):.1f} p99 {r.get('p99_ms', 0):.1f} ms "
                      f"errors {r['errors']}", flush=True)  # fmt: skip
            results[s.label] = runs
    finally:
        for s in scenarios:
            if s.proc is not None:
                os.killpg(s.proc.pid, signal.SIGTERM)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "data": args.data.name,
            "duration_s": args.duration_s, "server_cpus": args.server_cpus,
            "wrk_cpus": args.wrk_cpus, "hey_workers": args.hey_workers,
            "scenarios": {s.label: s.spec for s in scenarios},
            "wall_s": round(time.monotonic() - started, 1)}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"meta": meta, "results": results},
                                                          indent=2))  # fmt: skip
    lines = [f"# Load sweep ({meta['date']}, {meta['data']}, {args.duration_s} s per point, "
             f"servers on CPUs {args.server_cpus})", "",
             "| variant | loop | connections / offered req/s | req/s | p50 ms | p95 ms | p99 ms | "
             "server p50 ms | server p99 ms | errors |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for label, runs in results.items():
        for kind, key in (("closed", "connections"), ("open", "offered_rps")):
            for r in runs[kind]:
                sp50, sp99 = r.get("server_p50_ms"), r.get("server_p99_ms")
                lines.append(
                    f"| {label} | {kind} | {r[key]:,.0f} | {r['rps']:,.0f} | "
                    f"{r.get('p50_ms', 0):.1f} | {r.get('p95_ms', 0):.1f} | "
                    f"{r.get('p99_ms', 0):.1f} | "
                    f"{'-' if sp50 is None else f'{sp50:.1f}'} | "
                    f"{'-' if sp99 is None else f'{sp99:.1f}'} | {r['errors']} |"
                )
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    plot(results, RESULTS / f"{args.name}.png", f"{args.name}: {meta['data']}, servers on CPUs "
         f"{args.server_cpus}")  # fmt: skip
    print("\n".join(lines))
    print(f"wall {meta['wall_s']} s")


if __name__ == "__main__":
    main()
