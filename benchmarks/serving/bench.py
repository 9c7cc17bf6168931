"""HTTP throughput and latency of the service against its peers, measured with `wrk`.

    python -m benchmarks.serving.bench --store model_store/models \
        --data ../shared/data/ml-1m/ml-1m.txt --scenario bare=bare \
        --scenario int8=service:student=ml1m-student-int8@latest ...

Every server runs pinned to `--server-cpus` (default CPU 0), wrk to `--wrk-cpus` (default CPU 1),
on 127.0.0.1; all servers start
before the first measurement and the scenarios alternate round by round (A B C A B C ...), so
slow drifts of this noisy machine hit all of them alike. Request bodies are real: the
histories of test users of the data set (original item ids, oldest first), k = 10.
Writes JSON and a markdown table under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from app.compare import histogram_quantile

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"
LUA = HERE / "post_bodies.lua"


@dataclass
class Scenario:
    label: str
    # "bare" | "ort:FOLDER" | "torch:FOLDER" | "service:VAR=REF[,VAR=REF];key=value", where
    # key is a RECSYS_ setting, or `code` for the checkout to run (its PYTHONPATH)
    spec: str
    port: int
    proc: subprocess.Popen | None = None
    cwd: str | None = None
    runs: list[dict[str, Any]] = field(default_factory=list)

    def command(self, store: Path) -> tuple[list[str], dict[str, str]]:
        env = dict(os.environ)
        kind, _, rest = self.spec.partition(":")
        if kind == "bare":
            return [sys.executable, "-m", "benchmarks.serving.peers", "bare", "--port",
                    str(self.port)], env  # fmt: skip
        if kind in ("ort", "torch"):
            return [sys.executable, "-m", "benchmarks.serving.peers", kind, "--port",
                    str(self.port), "--model", rest], env  # fmt: skip
        if kind != "service":
            raise SystemExit(f"scenario {self.label}: unknown kind {kind!r}")
        variants, *options = rest.split(";")
        cmd = [sys.executable, "-m", "recsys_cli.main", "serve", "--store", str(store),
               "--port", str(self.port)]  # fmt: skip
        for v in variants.split(","):
            cmd += ["--variant", v]
        for option in options:  # e.g. batch__max_batch_size=1
            key, _, value = option.partition("=")
            if key == "code":  # another checkout of the service (e.g. the previous commit)
                env["PYTHONPATH"] = self.cwd = value  # `python -m` puts the cwd first
                continue
            env[f"RECSYS_{key.upper()}"] = value
        env.setdefault("RECSYS_LOG_LEVEL", "warning")
        return cmd, env


def write_bodies(data: Path, path: Path, users: int, seed: int) -> int:
    """Test-user histories (every item but the held-out last one) as request bodies."""
    lines = data.read_text().splitlines()
    rng = random.Random(seed)
    chosen = rng.sample(lines, min(users, len(lines)))
    with path.open("w") as out:
        for line in chosen:
            user, *items = line.split()
            body = {"user_id": f"u{user}", "history": [int(i) for i in items[:-1]], "k": 10}
            out.write(json.dumps(body, separators=(",", ":")) + "\n")
    return len(chosen)


def wait_ready(port: int, body: bytes, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/recommend", body,
                                         {"Content-Type": "application/json"})  # fmt: skip
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server on port {port} did not answer within {timeout_s} s")


def run_wrk(
    port: int, bodies: Path, connections: int, duration_s: int, cpus: str = "1"
) -> dict[str, Any]:
    cmd = ["taskset", "-c", cpus, "wrk", "-t1", f"-c{connections}", f"-d{duration_s}s",
           "--timeout", "5s", "-s", str(LUA), f"http://127.0.0.1:{port}/v1/recommend", "--",
           str(bodies)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    match = re.search(r"WRK_JSON (\{.*\})", out)
    if not match:
        raise SystemExit(f"wrk printed no summary:\n{out}")
    r = json.loads(match.group(1))
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    r["errors"] = sum(r[k] for k in r if k.startswith("errors_")) + r["non_2xx"]
    return r


def scrape(port: int) -> dict[str, list[tuple[float, float]]]:
    """Cumulative request-duration buckets per variant from the service's /metrics."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except Exception:
        return {}
    out: dict[str, list[tuple[float, float]]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "recsys_request_duration_seconds":
            continue
        for s in family.samples:
            if s.name.endswith("_bucket"):
                out.setdefault(s.labels["variant"], []).append((float(s.labels["le"]), s.value))
    return {k: sorted(v) for k, v in out.items()}


def server_quantiles(before: dict, after: dict) -> dict[str, float | None]:
    """p50/p99 of the service's own histogram over one run (bucket deltas, all variants)."""
    total: dict[float, float] = {}
    for variant, buckets in after.items():
        prev = dict(before.get(variant, []))
        for le, count in buckets:
            total[le] = total.get(le, 0.0) + count - prev.get(le, 0.0)
    buckets = sorted(total.items())
    return {f"server_p{q}_ms": (None if (v := histogram_quantile(q / 100, buckets)) is None
                                else v * 1e3) for q in (50, 99)}  # fmt: skip


def summarize(s: Scenario) -> dict[str, Any]:
    def med(key: str) -> float | None:
        values = [r[key] for r in s.runs if r.get(key) is not None]
        return statistics.median(values) if values else None

    return {
        "label": s.label,
        "spec": s.spec,
        "rounds": len(s.runs),
        "rps": med("rps"),
        "p50_ms": (med("p50_us") or 0) / 1e3,
        "p99_ms": (med("p99_us") or 0) / 1e3,
        "errors": sum(r["errors"] for r in s.runs),
        "server_p50_ms": med("server_p50_ms"),
        "server_p99_ms": med("server_p99_ms"),
    }


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"# Serving benchmark ({meta['date']})",
        "",
        f"wrk, 1 thread, {meta['connections']} connections, {meta['duration_s']} s x "
        f"{meta['rounds']} alternating rounds per scenario (median shown); {meta['cpu']}; "
        f"bodies: {meta['bodies']} real test-user histories of "
        f"{meta['data']}, k = 10.",
        "",
        "| scenario | req/s | p50 ms | p99 ms | p99/p50 | errors | server p50 ms | server p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        sp50, sp99 = r["server_p50_ms"], r["server_p99_ms"]
        lines.append(
            f"| {r['label']} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r['p99_ms'] / max(r['p50_ms'], 1e-9):.2f} | {r['errors']} | "
            f"{'-' if sp50 is None else f'{sp50:.2f}'} | {'-' if sp99 is None else f'{sp99:.2f}'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="sequence file for bodies")
    parser.add_argument("--scenario", action="append", required=True, help="LABEL=SPEC")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration-s", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--name", default="serving")
    parser.add_argument("--server-cpus", default="0", help="taskset list for every server")
    parser.add_argument("--wrk-cpus", default="1", help="taskset list for wrk")
    args = parser.parse_args()

    bodies = Path("/tmp") / f"{args.name}-bodies.jsonl"
    n_bodies = write_bodies(args.data, bodies, args.users, seed=0)
    first_body = bodies.read_text().splitlines()[0].encode()
    scenarios = []
    for i, item in enumerate(args.scenario):
        label, _, spec = item.partition("=")
        scenarios.append(Scenario(label, spec, port=8100 + i))
    try:
        for s in scenarios:
            cmd, env = s.command(args.store)
            log = open(Path("/tmp") / f"{args.name}-{s.label}.log", "w")  # noqa: SIM115
            pinned = ["taskset", "-c", args.server_cpus, *cmd]
            s.proc = subprocess.Popen(pinned, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True, cwd=s.cwd)  # fmt: skip
        for s in scenarios:
            wait_ready(s.port, first_body)
            run_wrk(s.port, bodies, args.connections, 2, args.wrk_cpus)  # warm-up, discarded
        for round_ in range(args.rounds):
            for s in scenarios:
                before = scrape(s.port)
                r = run_wrk(s.port, bodies, args.connections, args.duration_s, args.wrk_cpus)
                r.update(server_quantiles(before, scrape(s.port)))
                s.runs.append(r)
                print(f"round {round_ + 1} {s.label}: {r['rps']:,.0f} req/s, p50 "
                      f"{r['p50_us'] / 1e3:.2f} ms, p99 {r['p99_us'] / 1e3:.2f} ms, "
                      f"errors {r['errors']}", flush=True)  # fmt: skip
    finally:
        for s in scenarios:
            if s.proc is not None:
                os.killpg(s.proc.pid, signal.SIGTERM)
    rows = [summarize(s) for s in scenarios]
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "connections": args.connections,
        "duration_s": args.duration_s,
        "rounds": args.rounds,
        "bodies": n_bodies,
        "data": args.data.name,
        "cpu": f"servers on CPUs {args.server_cpus}, wrk (1 thread) on CPUs {args.wrk_cpus}",
    }
    RESULTS.mkdir(exist_ok=True)
    out = {"meta": meta, "scenarios": rows, "runs": {s.label: s.runs for s in scenarios}}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(out, indent=2))
    (RESULTS / f"{args.name}.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
