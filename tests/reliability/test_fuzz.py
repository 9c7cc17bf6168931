"""Schemathesis against a live `recsys serve`, every check, seeded: the API keeps its contract.

The schemathesis command line runs in its own process against a real server, as a user's
generated client would talk to it, so the test depends on neither schemathesis' pytest
internals nor test order. All checks are on (`--checks all`), schema-valid and
schema-violating data (`--mode all`), every phase; admin calls carry the real token and the
`ignored_auth` check also sends them without it. Failures are 0, or the test fails with
schemathesis' own report (each failure with a curl line to replay it).

The server runs with limits chosen so that every schema-valid body fits in
`max_body_bytes`: the schema cannot express a byte limit, and 413 is documented.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.reliability.conftest import TOKEN
from tests.reliability.live import post, serve

pytestmark = pytest.mark.slow  # ~30 s on 2 busy cores

MIN_REQUESTS = 1000
SEED = 20261206
VARIANTS = {"teacher": "tiny@1", "student": "tiny-small@1"}  # as in the schema's examples
ENV = {
    "RECSYS_VARIANTS": json.dumps(VARIANTS),
    "RECSYS_WEIGHTS": json.dumps({"teacher": 0.5, "student": 0.5}),
    "RECSYS_REFERENCE_VARIANT": "teacher",
    "RECSYS_ADMIN_TOKEN": TOKEN,
    "RECSYS_MAX_HISTORY_LEN": "50",
    "RECSYS_MAX_BATCH_REQUESTS": "4",
    # 4 requests x 50 ids x 256 characters, each up to 6 bytes as JSON escapes, fit.
    "RECSYS_MAX_BODY_BYTES": "1000000",
}


def _schemathesis() -> list[str]:
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("schemathesis is a dev dependency (requirements-dev.txt)")
    return [exe]


def test_the_live_api_keeps_its_openapi_contract(rel_store: Path, tmp_path: Path) -> None:
    cmd = _schemathesis()
    with serve(rel_store, ENV, []) as (base, _pid):
        report = tmp_path / "events.ndjson"
        run = subprocess.run(
            [*cmd, "run", f"{base}/openapi.json", "--checks", "all", "--mode", "all",
             "--seed", str(SEED), "--max-examples", "200", "--workers", "1",
             "--no-color", "--suppress-health-check", "all",
             "--header", f"Authorization: Bearer {TOKEN}",
             "--report", "ndjson", "--report-ndjson-path", str(report)],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        summary = run.stdout[-6000:] + run.stderr[-2000:]
        assert run.returncode == 0, summary
        # After the whole run, a normal call still works.
        status, _, body = post(f"{base}/v1/recommend", {"user_id": "probe", "history": [1001]})
        assert status == 200 and json.loads(body)["items"], body
    requests, failures = _count(report)
    assert failures == 0, summary
    assert requests >= MIN_REQUESTS, f"only {requests} requests\n{summary}"


def _count(report: Path) -> tuple[int, int]:
    """Requests sent and failed checks, from schemathesis' NDJSON event stream."""
    requests = failures = 0
    for line in report.read_text().splitlines():
        scenario = json.loads(line).get("ScenarioFinished")
        if scenario is None:
            continue
        recorder = scenario["recorder"]  # a skipped scenario records only its label
        requests += len(recorder.get("interactions", {}))
        for checks in recorder.get("checks", {}).values():
            failures += sum(1 for c in checks if c["status"] not in ("success", "skip"))
    return requests, failures
