"""Schemathesis against the app's own OpenAPI schema, in process (ASGI), seeded.

Every operation is fuzzed (examples, coverage and fuzzing phases; schema-valid and
schema-violating data); admin operations run with the generated `Authorization` header,
with the real token and with a wrong one. Properties, for every response:

- never a 5xx;
- every 4xx is JSON with non-empty `error` and `code` strings;
- Schemathesis' own checks: documented status codes, content types, headers and response
  bodies; schema-violating requests refused; undeclared methods answered 405.

Two of its checks are left out on purpose: `positive_data_acceptance` (the service's
run-time limits are stricter than the static schema: `max_k`, `max_history_len`, the
catalogue size, unknown variant names) and `allow_header_conformance` (Starlette's 405
lists the methods of one route when a path has several, e.g. GET and PUT /admin/routing).
"""

from __future__ import annotations

import collections
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.main import create_app
from tests.reliability.conftest import TOKEN, make_settings

# A dev dependency (schemathesis>=4.0); its 3.x API differs (from_asgi, checks, config).
schemathesis = pytest.importorskip("schemathesis", minversion="4.0")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import load_all_checks  # noqa: E402
from schemathesis.python import asgi  # noqa: E402

load_all_checks()  # registers the built-in checks imported next
from schemathesis.checks import allow_header_conformance, positive_data_acceptance  # noqa: E402

pytestmark = pytest.mark.slow  # ~13 s for the whole module on 2 busy cores

MIN_REQUESTS = 1000
# Variant names as in the schema's examples, so the examples phase reaches real variants.
VARIANTS = {"teacher": "tiny@1", "student": "tiny-small@1"}
SENT: collections.Counter[str] = collections.Counter()  # operation label -> requests sent
STATUSES: collections.Counter[tuple[str, int]] = collections.Counter()
HEALTH_PROBES: list[int] = []


@pytest.fixture(scope="module")
def fuzz_schema(rel_store: Path) -> Iterator[Any]:
    settings_ = make_settings(
        rel_store,
        admin_token=TOKEN,
        variants=VARIANTS,
        weights={"teacher": 0.5, "student": 0.5},
        reference_variant="teacher",
    )
    app = create_app(settings_)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)  # starts the lifespan
    with asgi.get_client(app) as client:
        deadline = time.monotonic() + 30
        while (r := client.get("/readyz")).status_code != 200:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.02)
    schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
    # A schema-violating body may also be refused for its size (413): a refusal all the same.
    schema.config.checks.negative_data_rejection.expected_statuses.append("413")
    yield schema
    asgi.shutdown_lifespans()  # Schemathesis' plugin also ends it after each test


schema = schemathesis.pytest.from_fixture("fuzz_schema")


def _with_auth_mode(case: Any) -> None:
    """Admin calls: keep the generated header, or send the real token, or a wrong one.

    The mode is a hash of the generated case, so it is the same on every run and replay;
    the schema's own examples always get the real token."""
    names = [p.get("name", "").lower() for p in case.operation.definition.raw.get("parameters", [])]
    if "authorization" not in names:
        return
    headers = dict(case.headers or {})
    generated = headers.pop("authorization", None)
    mode = zlib.crc32(repr((case.body, sorted(headers.items()), generated)).encode()) % 3
    if case.meta is not None and case.meta.phase.name == "examples":
        mode = 1  # the schema's examples name real variants: let them through
    if mode == 0 and generated is not None:
        headers["authorization"] = generated
    elif mode == 1:
        headers["authorization"] = f"Bearer {TOKEN}"
    elif mode == 2:
        headers["authorization"] = f"Bearer {generated or ''}x"
    case.headers = headers


@schema.parametrize()
@settings(
    max_examples=150,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_fuzz(case: Any) -> None:
    _with_auth_mode(case)
    response = case.call()
    label = case.operation.label
    SENT[label] += 1
    STATUSES[(label, response.status_code)] += 1
    assert response.status_code < 500, f"{label}: {response.status_code} {response.text[:500]}"
    if response.status_code >= 400:
        assert response.headers.get("content-type") == ["application/json"], response.headers
        body = response.json()
        assert isinstance(body.get("error"), str) and body["error"].strip(), body
        assert isinstance(body.get("code"), str) and body["code"].strip(), body
        assert "Traceback" not in response.text
    case.validate_response(
        response, excluded_checks=[positive_data_acceptance, allow_header_conformance]
    )
    if sum(SENT.values()) % 50 == 0:  # whatever the fuzzer did so far, a normal call works
        client = asgi.get_client(case.operation.app)
        r = client.get("/readyz")
        assert r.status_code == 200, r.text
        body = {"user_id": "probe", "history": [1001, 1002], "variant": "student"}
        r = client.post("/v1/recommend", json=body)
        assert r.status_code == 200 and r.json()["items"], r.text
        HEALTH_PROBES.append(r.status_code)


def test_fuzz_volume(request: pytest.FixtureRequest, fuzz_schema: Any) -> None:
    """Runs after test_fuzz (file order): enough requests, every operation reached."""
    # One item whose subtests are the operations (the schema comes from a fixture).
    if not any(i.name == "test_fuzz" for i in request.session.items):
        pytest.skip("test_fuzz was not selected")
    operations = [op.ok().label for op in fuzz_schema.get_all_operations()]
    total = sum(SENT.values())
    summary = f"{total} requests: {dict(SENT)}; statuses {dict(STATUSES)}"
    print(summary)
    assert total >= MIN_REQUESTS, summary
    assert set(SENT) == set(operations), summary
    for label in ("POST /v1/recommend", "POST /v1/recommend/batch", "PUT /admin/routing"):
        assert SENT[label] >= 100 and STATUSES[(label, 200)] > 0, summary
    for label in ("GET /admin/routing", "PUT /admin/routing", "POST /admin/reload"):
        assert STATUSES[(label, 401)] > 0, summary  # the fuzzer sent wrong tokens too
    assert STATUSES[("POST /admin/reload", 409)] > 0, summary  # reached a real reload
    assert len(HEALTH_PROBES) == total // 50, summary
