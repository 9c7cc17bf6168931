"""Overload: about 4x the measured capacity, offered open-loop for 30 s by 64 staggered hey
processes (1,024 connections; `live.hey_open_loop` says why one hey would measure its own
lock-step bursts instead). The service stays up and answers health checks, memory stays
bounded, the excess is refused fast with 429 and Retry-After, accepted requests finish within
their deadline, and throughput recovers at once when the load drops.

The service runs on one CPU and the load generators on the others, as they would on separate
machines: sharing 2 cores with 64 load-generator processes, the event loop waited for a CPU
(`recsys_event_loop_lag_seconds`: ~5% of its timers > 10 ms late at ~0.35 of a core busy)
and refusals measured p99 16-45 ms; an ASGI app that refuses without any work measured 5.1 ms
shared and 7.2 ms split, the service 5.6-6.1 ms split (inference at nice 19, the default).

The model is sized so that capacity is set by inference (hidden 128, 2 blocks, 200-item
histories), as in production: with a toy model, 4x capacity would exceed what any Python
HTTP stack can even parse, and every response, refusals included, would wait in socket
queues."""

from __future__ import annotations

import collections
import csv
import io
import json
import re
import statistics
import subprocess
import threading
import time
from pathlib import Path

import pytest

from compression.configs import ModelConfig
from compression.export.exporter import export_onnx
from compression.model.sasrec import SASRec
from model_store import ModelStore
from tests.integration.conftest import COUNTS, N_ITEMS, ORIGINAL_IDS
from tests.reliability.live import (
    _on,
    get,
    hey_open_loop,
    need,
    pin,
    post,
    rss_bytes,
    serve,
    split_cpus,
    wrk,
)

pytestmark = [pytest.mark.slow]
LUA = Path(__file__).resolve().parents[2] / "benchmarks" / "serving" / "post_bodies.lua"
DEADLINE_S = 0.5
OVERLOAD_S = 30


def heavy_store(root: Path) -> Path:
    import torch

    torch.manual_seed(0)
    cfg = ModelConfig(n_items=N_ITEMS, max_len=200, hidden=128, n_blocks=2, n_heads=2)
    build = root / "build"
    build.mkdir(parents=True)
    export_onnx(SASRec(cfg).eval(), build / "model.onnx")
    (build / "items.json").write_text(json.dumps({
        "format": "recsys-item-mapping/1", "n_items": N_ITEMS,
        "item_ids": [str(i) for i in ORIGINAL_IDS], "counts": COUNTS,
    }))  # fmt: skip
    ModelStore(root / "store").publish(
        "heavy", {"model.onnx": build / "model.onnx", "items.json": build / "items.json"},
        kind="benchmark-random", parent=None, architecture=cfg.model_dump(), recipe={},
        dataset={"name": "tiny", "sha256": "0" * 64, "n_users": 1, "n_items": N_ITEMS,
                 "n_interactions": 1},
        metrics={},
    )  # fmt: skip
    return root / "store"


def bodies(path: Path, n: int = 200) -> Path:
    with path.open("w") as out:
        for i in range(n):
            history = [ORIGINAL_IDS[(i * 7 + j) % N_ITEMS] for j in range(200)]
            out.write(json.dumps({"user_id": f"u{i}", "history": history, "k": 10}) + "\n")
    return path


def loop_lag_p99_s(metrics: str) -> float:
    """Upper bucket bound holding the 99th percentile of the service's event-loop lag."""
    buckets = [(float(m.group(1)), float(m.group(2))) for m in re.finditer(
        r'recsys_event_loop_lag_seconds_bucket\{le="([^"]+)"\} (\S+)', metrics)]  # fmt: skip
    total = buckets[-1][1]
    return next(le for le, count in buckets if count >= 0.99 * total)


def overload_setup(
    tmp_path: Path, max_queue_size: int
) -> tuple[set[int], set[int], dict[str, str], Path, Path]:
    """CPUs for the service and the load, its settings, request bodies and the heavy store."""
    need("wrk", "hey")
    split = split_cpus()
    if split is None:
        pytest.skip("needs 2 CPUs: one for the service, the others for the load generators")
    env = {
        "RECSYS_REQUEST_TIMEOUT_S": str(DEADLINE_S),
        "RECSYS_BATCH__MAX_QUEUE_SIZE": str(max_queue_size),
        "RECSYS_BATCH__MAX_BATCH_SIZE": "32",
    }
    return split[0], split[1], env, bodies(tmp_path / "bodies.jsonl"), heavy_store(tmp_path)


def test_four_times_capacity_for_30_s(tmp_path: Path) -> None:
    service_cpus, load_cpus, env, body_file, store = overload_setup(tmp_path, 64)
    with serve(store, env, ["--variant", "full=heavy@1"]) as (base, pid):
        pin(pid, service_cpus)
        url = f"{base}/v1/recommend"
        capacity = wrk(url, body_file, 32, 4, LUA, cpus=load_cpus)["rps"]
        rss_before = rss_bytes(pid)
        offered = 4 * capacity
        workers = 1024
        stop = threading.Event()
        health: list[tuple[int, float]] = []
        rss_peak = [rss_before]
        retry_after: list[str] = []

        def watch() -> None:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    status = get(f"{base}/healthz", 2)[0]
                except OSError:
                    status = 0
                health.append((status, time.perf_counter() - t0))
                rss_peak[0] = max(rss_peak[0], rss_bytes(pid))
                probe = {"user_id": "probe", "history": ORIGINAL_IDS[:20]}
                try:
                    status, headers, _ = post(url, probe, None, 2)
                except OSError:
                    status, headers = 0, {}
                if status == 429:
                    retry_after.append(headers.get("Retry-After", ""))
                time.sleep(0.25)

        watcher = threading.Thread(target=watch)
        watcher.start()
        (tmp_path / "one.json").write_text(body_file.read_text().splitlines()[5])
        try:
            rows = hey_open_loop(url, tmp_path / "one.json", workers, offered, OVERLOAD_S,
                                 tmp_path / "hey", cpus=load_cpus)  # fmt: skip
        finally:
            stop.set()
            watcher.join()
        lag = loop_lag_p99_s(get(f"{base}/metrics")[2].decode())
        after = wrk(url, body_file, 32, 4, LUA, cpus=load_cpus)

    ok = [float(r["response-time"]) for r in rows if r["status-code"] == "200"]
    refused = [float(r["response-time"]) for r in rows if r["status-code"] == "429"]
    other = [r["status-code"] for r in rows if r["status-code"] not in ("200", "429")]
    p99 = lambda xs: statistics.quantiles(xs, n=100)[98]  # noqa: E731
    figures = {
        "capacity_rps": round(capacity), "offered_rps": round(offered),
        "sent": len(rows), "ok": len(ok), "refused_429": len(refused), "other": len(other),
        "ok_p99_s": round(p99(ok), 4), "refused_p99_s": round(p99(refused), 4),
        "rss_growth_mb": round((rss_peak[0] - rss_before) / 1e6, 1),
        "health_checks": len(health), "health_max_s": round(max(s for _, s in health), 3),
        "after_rps": round(after["rps"]), "retry_after": sorted(set(retry_after)),
        "loop_lag_p99_s": lag,
    }  # fmt: skip
    print(f"overload: {figures}")  # the README quotes these figures
    assert len(rows) > 2 * capacity * OVERLOAD_S  # really offered well above capacity
    # Goodput: measured 82-83% of capacity (docs/results/2026-12-06-serving-batcher.md);
    # 70% leaves room for this noisy machine and still fails a starved engine.
    assert refused and len(ok) > 0.7 * capacity * OVERLOAD_S, figures
    assert all(status == 200 for status, _ in health) and figures["health_max_s"] < 1.0
    # Measured +61 to +108 MB over 6 runs on 2026-12-06 (docs/results): mostly buffers of the
    # 1,024 open connections, not queued work. The target is 100 MB; the test keeps
    # 20 MB of room for this machine's variance and fails a real leak.
    assert figures["rss_growth_mb"] <= 120, figures
    # A refusal does no model work, so it must be far faster than a served request: 10 ms,
    # or a tenth of the served p99 on a slower day (this VM's capacity varies 430-600 req/s,
    # and a refusal cannot beat the event loop's lag, which grows with it).
    assert figures["refused_p99_s"] <= max(0.010, figures["ok_p99_s"] / 10), figures
    assert figures["ok_p99_s"] <= DEADLINE_S + 0.05, figures  # accepted work meets its deadline
    assert not [c for c in other if c != "504"], figures  # nothing but deadline misses
    assert retry_after and all(v.isdigit() and int(v) >= 1 for v in retry_after)
    assert after["rps"] >= 0.8 * capacity and after["non_2xx"] == 0, figures


STORM_S = 15


def test_a_retry_storm_keeps_goodput(tmp_path: Path) -> None:
    """512 clients that resend at once after every 429 (hey's closed loop ignores
    Retry-After), on the service's own core. Before refusal pacing this served 0.3% of
    capacity: the event loop spent the core refusing and inference starved. Now retries wait
    their turn (a timer, no CPU), so the engine keeps most of the core."""
    service_cpus, load_cpus, env, body_file, store = overload_setup(tmp_path, 128)
    (tmp_path / "one.json").write_text(body_file.read_text().splitlines()[5])
    with serve(store, env, ["--variant", "full=heavy@1"]) as (base, pid):
        pin(pid, service_cpus)
        url = f"{base}/v1/recommend"
        capacity = wrk(url, body_file, 32, 4, LUA, cpus=load_cpus)["rps"]
        rss_before = rss_bytes(pid)
        health: list[int] = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                try:
                    health.append(get(f"{base}/healthz", 2)[0])
                except OSError:
                    health.append(0)
                time.sleep(0.5)

        watcher = threading.Thread(target=watch)
        watcher.start()
        cmd = [*_on(load_cpus), "hey", "-z", f"{STORM_S}s", "-c", "512", "-m", "POST", "-T",
               "application/json", "-D", str(tmp_path / "one.json"), "-o", "csv", url]  # fmt: skip
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=STORM_S + 60)
        finally:
            stop.set()
            watcher.join()
        rss_growth_mb = (rss_bytes(pid) - rss_before) / 1e6
        metrics = get(f"{base}/metrics")[2].decode()
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    statuses = collections.Counter(r["status-code"] for r in rows)
    held = re.search(r'recsys_refusal_delay_seconds_bucket\{le="0.0001"\} (\S+)', metrics)
    total = re.search(r"recsys_refusal_delay_seconds_count (\S+)", metrics)
    figures = {
        "capacity_rps": round(capacity), "sent": len(rows), "statuses": dict(statuses),
        "goodput_rps": round(statuses["200"] / STORM_S),
        "goodput_share": round(statuses["200"] / STORM_S / capacity, 3),
        "refusals_held": float(total.group(1)) - float(held.group(1)),  # type: ignore[union-attr]
        "rss_growth_mb": round(rss_growth_mb, 1), "health": collections.Counter(health),
    }  # fmt: skip
    print(f"retry storm: {figures}")
    assert figures["goodput_share"] >= 0.6, figures  # measured 0.82 (was 0.003)
    assert figures["refusals_held"] > 0, figures  # the pacing did the work
    # Accepted work meets its deadline: measured 0-3.2% of the answers as 504 over 7 runs
    # (the 3.2% in a fresh-clone CI run); 5% still fails the old collapse (1,793 504s for 37
    # answers).
    assert statuses["504"] <= 0.05 * statuses["200"], figures
    assert set(statuses) <= {"200", "429", "504"}, figures
    assert health and set(health) == {200}, figures
    # +62 to +106 MB measured (512 open connections' buffers); as in the open-loop test, the
    # target is 100 MB and the bound keeps 20 MB for this machine's variance.
    assert rss_growth_mb <= 120, figures
