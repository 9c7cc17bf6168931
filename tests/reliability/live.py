"""A real `recsys serve` process and real load generators (wrk, hey) for the load tests."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (Debian packages; .ci/run installs them)")


def get(url: str, timeout_s: float = 2.0) -> tuple[int, Any, bytes]:
    """Status, headers (case-insensitive `.get`), body."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def post(
    url: str, body: dict[str, Any], headers: dict[str, str] | None = None, timeout_s: float = 5
) -> tuple[int, Any, bytes]:
    data = json.dumps(body).encode()
    req = urllib.request.Request(
        url, data, {"Content-Type": "application/json", **(headers or {})}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


@contextmanager
def serve(store: Path, env: dict[str, str], args: list[str]) -> Iterator[tuple[str, int]]:
    """Start `recsys serve` on a free port; yields (base url, pid); stops it afterwards."""
    port = free_port()
    full_env = {**os.environ, "RECSYS_STORE": str(store), "RECSYS_LOG_LEVEL": "warning", **env}
    cmd = [sys.executable, "-m", "recsys_cli.main", "serve", "--port", str(port), *args]
    # A file, not a pipe: nobody drains a pipe during the load, and a full pipe blocks the
    # server's logging, and with it the event loop.
    log = tempfile.NamedTemporaryFile("w+", prefix="recsys-serve-", suffix=".log")  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                log.seek(0)
                raise AssertionError(f"server exited: {log.read()[-2000:]}")
            try:
                if get(f"{base}/readyz", 1)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        else:
            raise AssertionError("server not ready within 60 s")
        yield base, proc.pid
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def rss_bytes(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) * 1024  # type: ignore[union-attr]


def split_cpus() -> tuple[set[int], set[int]] | None:
    """One CPU for the service, the others for the load generators (as on separate
    machines); None with a single CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    return ({cpus[0]}, set(cpus[1:])) if len(cpus) >= 2 else None


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` onto `cpus`; threads it starts later inherit it."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), cpus)


def _on(cpus: set[int] | None) -> list[str]:
    return ["taskset", "-c", ",".join(map(str, sorted(cpus)))] if cpus else []


def wrk(url: str, body_file: Path, connections: int, duration_s: float, script: Path,
        timeout_s: float = 5.0, cpus: set[int] | None = None) -> dict[str, Any]:  # fmt: skip
    cmd = [*_on(cpus), "wrk", "-t1", f"-c{connections}", f"-d{round(duration_s)}s", "--timeout",
           f"{round(timeout_s)}s", "-s", str(script), url, "--", str(body_file)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=duration_s + 60)
    match = re.search(r"WRK_JSON (\{.*\})", out.stdout)
    assert match, out.stdout + out.stderr
    result = json.loads(match.group(1))
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    return result


def hey_open_loop(
    url: str, body: Path, connections: int, rate: float, duration_s: int, out_dir: Path,
    processes: int = 64, cpus: set[int] | None = None,
) -> list[dict[str, str]]:  # fmt: skip
    """Offer `rate` req/s over `connections` for `duration_s` with hey; one CSV row per request.

    The load comes from `processes` hey processes started evenly over one send period. One
    hey with all the connections paces every worker with its own identical ticker started
    at the same instant, so they fire in lock-step: every ~`connections / rate` s a burst of
    all of them at once. Measured here against an ASGI app that answers 429 without any
    work, at 3,000 req/s over 1,024 connections: one hey saw p99 99-110 ms (its own burst
    queueing), 64 staggered ones p99 5.1 ms.
    """
    per_process = connections // processes
    period_s = connections / rate
    out_dir.mkdir(parents=True, exist_ok=True)
    procs, files = [], []
    for i in range(processes):
        cmd = [*_on(cpus), "hey", "-z", f"{duration_s}s", "-c", str(per_process), "-q",
               f"{rate / connections:.3f}", "-m", "POST", "-T", "application/json",
               "-D", str(body), "-o", "csv", url]  # fmt: skip
        out = (out_dir / f"hey-{i}.csv").open("w")
        files.append(out)
        procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL))
        time.sleep(period_s / processes)
    try:
        for p in procs:
            p.wait(timeout=duration_s + 60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in files:
            f.close()
    rows: list[dict[str, str]] = []
    for i in range(processes):
        with (out_dir / f"hey-{i}.csv").open() as f:
            rows.extend(csv.DictReader(f))
    return rows
