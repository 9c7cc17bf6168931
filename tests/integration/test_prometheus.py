"""The monitoring stack in deploy/ against real Prometheus tools and the real service.

- Every metric the rules and the Grafana dashboard use is exported by `app.metrics.Metrics`,
  and every recording rule they use is defined.
- `promtool check config`, `promtool check rules`, `promtool test rules` (the alert unit tests
  in deploy/prometheus/tests/) pass, and every dashboard query is valid PromQL.
- End to end: `recsys serve` (tiny models, two variants, shadow traffic) as a subprocess and
  Prometheus on 127.0.0.1, scraping every second and evaluating deploy/prometheus's rule files
  unchanged; under load on both variants every recording rule returns a sane value per variant.

Needs the `prometheus` and `promtool` binaries (Debian: `apt-get install -y prometheus`);
without them the tests that run them skip. Run: `python -m pytest -q
tests/integration/test_prometheus.py -m slow`.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.metrics import Metrics

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = REPO_ROOT / "deploy" / "prometheus"
PROM_CONFIG = PROM_DIR / "prometheus.yml"
RULE_FILES = [PROM_DIR / "recording_rules.yml", PROM_DIR / "alert_rules.yml"]
RULE_TESTS = sorted((PROM_DIR / "tests").glob("*.yml"))
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "dashboards" / "recsys.json"
# Grafana variables in dashboard queries, replaced by what they expand to for promtool.
GRAFANA_VARS = {
    "${variant}": ".*",
    "$variant": ".*",
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
}

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
INSTALL = "install it with: apt-get install -y prometheus (Debian; provides promtool too)"
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason=f"promtool not found; {INSTALL}")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None, reason=f"prometheus not found; {INSTALL}"
)


# -- what the rules and the dashboard reference ------------------------------------------------


def exported_series_names() -> set[str]:
    """Every series name the service's registry can expose (suffixes included)."""
    names = set()
    for family in Metrics().registry.collect():
        suffixes = {
            "counter": ("_total", "_created"),
            "histogram": ("_bucket", "_sum", "_count", "_created"),
        }.get(family.type, ("",))
        names |= {family.name + s for s in suffixes}
    return names


def load_rules() -> list[dict[str, Any]]:
    return [
        rule
        for path in RULE_FILES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
    ]


def recording_rules() -> dict[str, str]:
    return {r["record"]: r["expr"] for r in load_rules() if "record" in r}


def dashboard_panels() -> list[dict[str, Any]]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana variables expanded) for every query of every panel."""
    out = []
    for panel in dashboard_panels():
        for target in panel["targets"]:
            expr = target["expr"]
            for var, value in GRAFANA_VARS.items():
                expr = expr.replace(var, value)
            out.append((panel["title"], expr))
    return out


def referenced_names(expr: str) -> tuple[set[str], set[str]]:
    """(recording-rule names, raw recsys_* metric names) an expression reads."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values are not names
    tokens = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", bare))
    rules = {t for t in tokens if ":" in t}
    raw = {t for t in tokens if t.startswith("recsys_")}
    return rules, raw


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_rules_and_dashboard_use_only_exported_metrics_and_defined_rules() -> None:
    exported, recorded = exported_series_names(), recording_rules()
    sources = [(f"rule {r.get('record') or r.get('alert')}", r["expr"]) for r in load_rules()]
    sources += [(f"panel {title!r}", expr) for title, expr in dashboard_exprs()]
    used_rules: set[str] = set()
    for where, expr in sources:
        rules, raw = referenced_names(expr)
        assert raw <= exported, f"{where}: {sorted(raw - exported)} not in app/metrics.py"
        assert rules <= set(recorded), f"{where}: undefined recording rules {rules - set(recorded)}"
        used_rules |= rules
        assert "$" not in expr, f"{where}: unexpanded Grafana variable in {expr!r}"
    # Every recording rule is shown or alerted on; p95 of queue wait and inference are kept
    # for ad-hoc queries (the panel shows their p50 and p99).
    unused = set(recorded) - used_rules
    assert unused <= {
        "variant:recsys_queue_wait_seconds:p95_1m",
        "variant:recsys_inference_duration_seconds:p95_1m",
    }, f"recorded but never used: {unused}"
    # Names follow level:metric:operation, and the metric part is an exported metric.
    for name in recorded:
        level, metric, operation = name.split(":")
        assert level and operation, name
        assert {metric, metric + "_total", metric + "_bucket"} & exported, name


def test_dashboard_covers_the_issue_panels_and_uses_one_datasource_variable() -> None:
    board = json.loads(DASHBOARD.read_text())
    panels = dashboard_panels()
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert {i["name"] for i in board["__inputs"]} == {"DS_PROMETHEUS"}
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
        assert p["targets"], f"panel {p['title']!r} has no query"
        assert all(t["datasource"] == p["datasource"] for t in p["targets"])
        assert {"x", "y", "w", "h"} <= set(p["gridPos"])
    everything = " ".join(expr for _, expr in dashboard_exprs())
    for needed in [
        "variant:recsys_request_duration_seconds:p50_1m",
        "variant:recsys_request_duration_seconds:p95_1m",
        "variant:recsys_request_duration_seconds:p99_1m",
        "variant_status:recsys_requests:rate1m",
        "variant:recsys_requests:error_ratio_rate1m",
        "variant:recsys_batch_size:mean_1m",
        "recsys_queue_depth",
        "variant:recsys_queue_wait_seconds:p99_1m",
        "variant:recsys_inference_duration_seconds:p99_1m",
        "variant_reason:recsys_rejected:rate1m",
        "variant_candidate:recsys_shadow_agreement:mean_1m",
        "recsys_model_info",
        "recsys_ready",
    ]:
        assert needed in everything, f"no panel shows {needed}"


def test_alerts_carry_for_severity_and_annotations() -> None:
    alerts = [r for r in load_rules() if "alert" in r]
    assert {a["alert"] for a in alerts} >= {
        "RecsysLatencyP99AboveSLO",
        "RecsysErrorRatioHigh",
        "RecsysQueueNearFull",
        "RecsysQueueFullRejections",
        "RecsysShadowAgreementLow",
        "RecsysNotReady",
        "RecsysTargetDown",
    }
    for a in alerts:
        assert a.get("for"), f"{a['alert']}: no `for`"
        assert a["labels"]["severity"] in {"page", "ticket"}, a["alert"]
        assert a["annotations"]["summary"] and a["annotations"]["description"], a["alert"]
    # Every alert has a unit test in deploy/prometheus/tests/ that expects it to fire.
    tested = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            tested |= {t["alertname"] for t in case.get("alert_rule_test", []) if t["exp_alerts"]}
    assert tested == {a["alert"] for a in alerts}


# -- promtool ---------------------------------------------------------------------------------


@needs_promtool
def test_promtool_check_config_and_rules() -> None:
    for args in (("check", "config", str(PROM_CONFIG)), ("check", "rules", *map(str, RULE_FILES))):
        result = promtool(*args)
        assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_rule_unit_tests() -> None:
    assert RULE_TESTS, "no promtool unit tests in deploy/prometheus/tests/"
    result = promtool("test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """Each panel query becomes a throwaway recording rule; promtool parses them all."""
    rules = [
        {"record": f"dashboard:panel_{i}:check", "expr": expr}
        for i, (_, expr) in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


# -- end to end: the service, Prometheus, the rules as they are ---------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{url}: process exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            r = httpx.get(url, timeout=2.0)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.2)
    pytest.fail(f"{url} not ready after {timeout_s} s ({last}):\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`recsys serve` with variants full=tiny@1, small=tiny-small@1 and every full request
    shadowed on small; yields its base URL."""
    from model_store import ModelStore
    from tests.integration.conftest import publish_tiny

    root = tmp_path_factory.mktemp("prom-store")
    store = ModelStore(root)
    publish_tiny(store, "tiny", seed=0)
    publish_tiny(store, "tiny-small", seed=2, hidden=8)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSYS_")}
    env.update(OMP_NUM_THREADS="1", RECSYS_SHADOW_VARIANT="small", RECSYS_SHADOW_FRACTION="1.0")
    log = root / "service.log"
    cmd = [
        sys.executable,
        "-m",
        "recsys_cli.main",
        "serve",
        "--store",
        str(root),
        "--variant",
        "full=tiny@1",
        "--variant",
        "small=tiny-small@1",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--threads",
        "1",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/readyz", proc, log, timeout_s=60)
        yield url
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def prometheus(service: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Prometheus on 127.0.0.1 with deploy/prometheus/prometheus.yml, changed only in its
    intervals (1 s) and its target file; the rule files are loaded from deploy/ as they are."""
    if PROMETHEUS is None or PROMTOOL is None:
        pytest.skip(f"prometheus not found; {INSTALL}")
    root = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load(PROM_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROM_DIR / name) for name in config["rule_files"]]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "recsys"]
    job.update(scrape_interval="1s", scrape_timeout="1s")
    targets = root / "targets.yml"
    targets.write_text(yaml.safe_dump([{"targets": [service.removeprefix("http://")]}]))
    job["file_sd_configs"] = [{"files": [str(targets)], "refresh_interval": "1s"}]
    path = root / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    check = promtool("check", "config", str(path))
    assert check.returncode == 0, check.stdout + check.stderr

    port = free_port()
    log = root / "prometheus.log"
    cmd = [
        PROMETHEUS,
        f"--config.file={path}",
        f"--storage.tsdb.path={root / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=root)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/-/ready", proc, log, timeout_s=30)
        yield url
    finally:
        stop(proc)


class Load(threading.Thread):
    """Recommendation requests at a steady pace, alternating X-Variant full / small."""

    def __init__(self, url: str, per_s: float = 40.0) -> None:
        super().__init__(daemon=True)
        self.url, self.period = url, 1.0 / per_s
        self.halt = threading.Event()
        self.statuses: dict[tuple[str, int], int] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        import httpx

        try:
            with httpx.Client(base_url=self.url, timeout=5.0) as client:
                i = 0
                while not self.halt.is_set():
                    variant = ("full", "small")[i % 2]
                    body = {
                        "user_id": f"u{i % 97}",
                        "history": [1000 + (i + j) % 40 for j in range(1 + i % 6)],
                        "k": 5,
                    }
                    r = client.post("/v1/recommend", json=body, headers={"X-Variant": variant})
                    key = (variant, r.status_code)
                    self.statuses[key] = self.statuses.get(key, 0) + 1
                    i += 1
                    self.halt.wait(self.period)
        except BaseException as exc:  # reported by the test, never lost in the thread
            self.error = exc

    @property
    def sent(self) -> int:
        return sum(self.statuses.values())


def query(prom: str, expr: str) -> list[dict[str, Any]]:
    import httpx

    r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=5.0)
    r.raise_for_status()
    body = r.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


VARIANTS = ("full", "small")
PER_VARIANT_RULES = [
    f"variant:{metric}:{q}_1m"
    for metric in (
        "recsys_request_duration_seconds",
        "recsys_queue_wait_seconds",
        "recsys_inference_duration_seconds",
    )
    for q in ("p50", "p95", "p99")
] + [
    "variant:recsys_requests:rate1m",
    'variant_status:recsys_requests:rate1m{status="ok"}',
    "variant:recsys_requests:error_ratio_rate1m",
    "variant:recsys_batch_size:mean_1m",
    "variant:recsys_queue_depth:max_1m",
]
SHADOW_RULE = "variant_candidate:recsys_shadow_agreement:mean_1m"
MIN_REQUESTS = 300


def collect(prom: str) -> dict[str, dict[str, float]]:
    """{rule: {variant (or variant/candidate): value}} for the values present and finite."""
    out: dict[str, dict[str, float]] = {}
    for rule in [*PER_VARIANT_RULES, SHADOW_RULE]:
        for sample in query(prom, rule):
            m, value = sample["metric"], float(sample["value"][1])
            key = m["variant"] + (f"/{m['candidate']}" if "candidate" in m else "")
            if math.isfinite(value):
                out.setdefault(rule, {})[key] = value
    return out


def complete(values: dict[str, dict[str, float]]) -> bool:
    per_variant = all(set(VARIANTS) <= set(values.get(r, {})) for r in PER_VARIANT_RULES)
    return per_variant and "full/small" in values.get(SHADOW_RULE, {})


@needs_prometheus
def test_prometheus_scrapes_the_service_and_records_every_rule_per_variant(
    service: str, prometheus: str
) -> None:
    started = time.monotonic()
    load = Load(service)
    load.start()
    values: dict[str, dict[str, float]] = {}
    try:
        deadline = started + 60
        while time.monotonic() < deadline:
            values = collect(prometheus)
            if complete(values) and load.sent >= MIN_REQUESTS:
                break
            assert load.is_alive(), f"load generator stopped: {load.error!r}"
            time.sleep(1.0)
    finally:
        load.halt.set()
        load.join(timeout=10)
    elapsed = time.monotonic() - started
    assert load.error is None, repr(load.error)
    missing = {
        r: sorted(set(VARIANTS) - set(values.get(r, {})))
        for r in PER_VARIANT_RULES
        if not set(VARIANTS) <= set(values.get(r, {}))
    }
    assert complete(values), f"after {elapsed:.0f} s, no value for {missing} / {values}"
    failed = {key: n for key, n in load.statuses.items() if key[1] != 200}
    assert not failed, f"requests that failed: {load.statuses}"

    for v in VARIANTS:
        for metric in (
            "request_duration_seconds",
            "queue_wait_seconds",
            "inference_duration_seconds",
        ):
            p50, p95, p99 = (
                values[f"variant:recsys_{metric}:{q}_1m"][v] for q in ("p50", "p95", "p99")
            )
            assert 0 <= p50 <= p95 <= p99 < 1.0, (v, metric, p50, p95, p99)
        assert values["variant:recsys_requests:rate1m"][v] > 0
        assert values['variant_status:recsys_requests:rate1m{status="ok"}'][v] > 0
        assert values["variant:recsys_requests:error_ratio_rate1m"][v] == 0
        assert values["variant:recsys_batch_size:mean_1m"][v] >= 1
        assert values["variant:recsys_queue_depth:max_1m"][v] >= 0
    assert 0 <= values[SHADOW_RULE]["full/small"] <= 1

    # The scrape, readiness and model versions, straight from the exported series.
    assert [float(s["value"][1]) for s in query(prometheus, 'up{job="recsys"}')] == [1.0]
    assert [float(s["value"][1]) for s in query(prometheus, "recsys_ready")] == [1.0]
    info = {s["metric"]["variant"]: s["metric"] for s in query(prometheus, "recsys_model_info")}
    assert (info["full"]["model"], info["full"]["version"]) == ("tiny", "1")
    assert (info["small"]["model"], info["small"]["version"]) == ("tiny-small", "1")
    assert info["full"]["engine"] == "onnxruntime-cpu"

    # Every rule of deploy/ was loaded and evaluates without error.
    import httpx

    groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=5.0).json()["data"]["groups"]
    loaded = {r["name"]: r for g in groups for r in g["rules"]}
    defined = {r.get("record") or r["alert"] for r in load_rules()}
    assert set(loaded) == defined
    bad = {name: r.get("lastError") for name, r in loaded.items() if r["health"] != "ok"}
    assert not bad, bad
    firing = [a for a in query(prometheus, "ALERTS") if a["metric"]["alertstate"] == "firing"]
    assert not firing, firing
    print(f"\nall rules recorded after {elapsed:.1f} s and {load.sent} requests: {load.statuses}")
