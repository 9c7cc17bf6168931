"""The serving API through `with TestClient(create_app(...))` (the lifespan runs), on tiny
models published into a temporary store: answers, fallbacks, every error path, admin."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.integration.conftest import MAX_LEN, N_ITEMS, reference_scores, wait_ready

TOKEN = "s3cret-token-0123456789"
REPO = str(Path(__file__).resolve().parents[2])  # no response may reveal where the code lives
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def make_settings(store: Path, **kw: object) -> Settings:
    base: dict[str, object] = {
        "store": str(store),
        "variants": {"full": "tiny@1", "small": "tiny-small@1"},
        "weights": {"full": 0.5, "small": 0.5},
        "reference_variant": "full",
        "max_history_len": 50,
        "max_body_bytes": 4096,
        "batch": {"max_batch_size": 8, "max_wait_s": 0.001},
    }
    return Settings(**{**base, **kw})  # type: ignore[arg-type]


@pytest.fixture
def client(serving_store: Path) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(serving_store, admin_token=TOKEN))) as c:
        wait_ready(c)
        yield c


def recommend(client: TestClient, **body: object) -> dict:
    r = client.post("/v1/recommend", json={"user_id": "u1", **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_answer_is_the_models_top_k_with_history_excluded(
    client: TestClient, serving_store: Path
) -> None:
    history = [1003, 1007, 1001, 1020]
    got = recommend(client, history=history, k=5, variant="full")
    assert got["variant"] == "full" and got["model_version"] == "tiny@1"
    assert got["source"] == "model" and got["unknown_items"] == 0
    scores = reference_scores(serving_store, "tiny@1", [h - 999 for h in history])
    scores[0] = -np.inf
    scores[[h - 999 for h in history]] = -np.inf
    want = [str(int(i) + 999) for i in np.argsort(-scores)[:5]]  # ids are strings
    assert [i["item_id"] for i in got["items"]] == want
    assert [i["score"] for i in got["items"]] == pytest.approx(np.sort(scores)[::-1][:5], 1e-5)


def test_exclude_history_false_may_return_history_items(client: TestClient) -> None:
    history = list(range(1000, 1000 + N_ITEMS - 3))
    sent = {str(i) for i in history}
    got = recommend(client, history=history, k=10, exclude_history=False, variant="full")
    assert len(got["items"]) == 10 and set(i["item_id"] for i in got["items"]) & sent
    got = recommend(client, history=history, k=10, variant="full")
    assert len(got["items"]) == 3 and not set(i["item_id"] for i in got["items"]) & sent


def test_unknown_items_are_dropped_and_counted(client: TestClient) -> None:
    known = recommend(client, history=[1005, 1006], k=5, variant="full")
    mixed = recommend(client, history=[1005, 77, 1006, 999999], k=5, variant="full")
    assert mixed["unknown_items"] == 2 and mixed["items"] == known["items"]
    assert 'recsys_unknown_items_total{variant="full"} 2.0' in client.get("/metrics").text


@pytest.mark.parametrize("history", [[], [5, 6, 7]])
def test_no_known_history_gets_popular_items(client: TestClient, history: list[int]) -> None:
    got = recommend(client, history=history, k=3)
    assert got["source"] == "popular"
    assert [i["item_id"] for i in got["items"]] == ["1039", "1000", "1001"]


def test_long_histories_keep_the_most_recent_items(client: TestClient) -> None:
    recent = [1010, 1011, 1012, 1013, 1014, 1015, 1016, 1017]
    assert len(recent) == MAX_LEN
    full = recommend(client, history=[1001, 1002, 1003, *recent], exclude_history=False,
                     variant="full")  # fmt: skip
    assert full["items"] == recommend(client, history=recent, exclude_history=False,
                                      variant="full")["items"]  # fmt: skip


def test_header_override_and_sticky_assignment(client: TestClient) -> None:
    r = client.post("/v1/recommend", json={"user_id": "u9", "history": [1001]},
                    headers={"X-Variant": "small"})  # fmt: skip
    assert r.json()["variant"] == "small"
    seen = {recommend(client, user_id="u-sticky", history=[1001])["variant"] for _ in range(10)}
    assert len(seen) == 1
    names = {recommend(client, user_id=f"user{i}", history=[1001])["variant"] for i in range(40)}
    assert names == {"full", "small"}
    metrics = client.get("/metrics").text
    for name in ("full", "small"):
        assert f'recsys_requests_total{{status="ok",variant="{name}"}}' in metrics
        assert f'recsys_request_duration_seconds_count{{variant="{name}"}}' in metrics


def test_batch_form(client: TestClient) -> None:
    body = {"requests": [{"user_id": "a", "history": [1001, 1002], "k": 2, "variant": "full"},
                         {"user_id": "b", "history": [], "k": 4}]}  # fmt: skip
    r = client.post("/v1/recommend/batch", json=body)
    assert r.status_code == 200
    first, second = r.json()["results"]
    assert len(first["items"]) == 2 and first["variant"] == "full"
    assert len(second["items"]) == 4 and second["source"] == "popular"


def error_of(r) -> dict:  # type: ignore[no-untyped-def]
    body = r.json()
    assert set(body) >= {"error", "code"}, body
    assert "Traceback" not in r.text and REPO not in r.text and ".py" not in r.text
    return body


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        ({"user_id": "u", "history": [""]}, 422, "history.0: String should have at least 1"),
        ({"user_id": "u", "history": [True]}, 422, "history.0: Input should be a valid integer"),
        ({"user_id": "u", "history": [-1]}, 422, "history.0"),
        ({"user_id": "u", "history": [1.5]}, 422, "history.0"),
        ({"user_id": "u", "history": [1], "k": 0}, 422, "k: "),
        ({"user_id": "u", "history": list(range(51))}, 422, "limit is 50"),
        ({"history": [1]}, 422, "user_id: Field required"),
        ({"user_id": "u", "history": [1], "variant": "nope"}, 404, "unknown variant 'nope'"),
        ({"user_id": "u", "history": [1], "extra": 1}, 422, "extra"),
        ([1, 2], 422, "should be an object"),
    ],
)  # fmt: skip
def test_bad_requests_get_a_clear_4xx(
    client: TestClient, body: object, status: int, fragment: str
) -> None:
    r = client.post("/v1/recommend", json=body)
    assert r.status_code == status
    assert fragment in error_of(r)["error"]


def test_malformed_json_oversized_and_wrong_content_type(client: TestClient) -> None:
    r = client.post("/v1/recommend", content=b'{"user_id": ', headers={"content-type":
                    "application/json"})  # fmt: skip
    assert r.status_code == 422 and "not valid JSON" in error_of(r)["error"]
    big = b'{"user_id": "u", "history": [' + b"1," * 5000 + b"1]}"
    r = client.post("/v1/recommend", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "4096" in error_of(r)["error"]
    r = client.post("/v1/recommend", content=b"user_id=u", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "application/json" in error_of(r)["error"]
    r = client.get("/v2/nothing")
    assert r.status_code == 404 and error_of(r)["code"] == "not_found"
    r = client.get("/v1/recommend")
    assert r.status_code == 405 and error_of(r)["code"] == "method_not_allowed"


def test_an_engine_failure_is_a_500_with_request_id_and_the_next_batch_succeeds(
    client: TestClient,
) -> None:
    engine = client.app.state.service.variants["full"].model.engine  # type: ignore[attr-defined]
    real_run = engine.run

    def broken(ids: np.ndarray) -> np.ndarray:
        raise RuntimeError("GPU fell off")

    engine.run = broken
    r = client.post("/v1/recommend", json={"user_id": "u", "history": [1001], "variant": "full"})
    body = error_of(r)
    assert r.status_code == 500 and len(body["request_id"]) == 32
    assert "GPU fell off" not in r.text
    engine.run = real_run
    assert recommend(client, history=[1001], variant="full")["source"] == "model"
    assert 'recsys_requests_total{status="error",variant="full"} 1.0' in client.get("/metrics").text


def test_a_crashed_batch_consumer_is_restarted_and_readiness_tells_meanwhile(
    client: TestClient,
) -> None:
    """The consumer task dies (a bug, not an engine error): the request it held fails at
    once (500, not a 504 at its deadline), /readyz says why while it restarts, the crash is
    counted, and the restarted consumer serves again."""
    batcher = client.app.state.service.variants["full"].batcher  # type: ignore[attr-defined]
    batcher.config.restart_backoff_s = 0.5
    original, calls = batcher._started, {"n": 0}

    def crash_once(batch):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("consumer bug")
        return original(batch)

    batcher._started = crash_once
    # A consumer already waiting for work looked `_started` up before the patch: then the
    # first request is served as usual and the next one meets the bug.
    outcomes = []
    for _ in range(3):
        started = time.perf_counter()
        r = client.post("/v1/recommend", json={"user_id": "u", "history": [1001],
                                               "variant": "full"})  # fmt: skip
        outcomes.append((r.status_code, time.perf_counter() - started))
        if r.status_code == 500:
            break
    assert [s for s, _ in outcomes[:-1]] == [200] * (len(outcomes) - 1), outcomes
    assert outcomes[-1][0] == 500 and outcomes[-1][1] < 0.5, outcomes
    r = client.get("/readyz")
    assert r.status_code == 503 and "consumer crashed" in error_of(r)["error"], r.text
    for _ in range(200):
        if client.get("/readyz").status_code == 200:
            break
        time.sleep(0.01)
    assert client.get("/readyz").status_code == 200
    assert recommend(client, history=[1001], variant="full")["source"] == "model"
    metrics = client.get("/metrics").text
    assert 'recsys_batcher_restarts_total{variant="full"} 1.0' in metrics


def test_variants_health_readiness_compare(client: TestClient) -> None:
    v = client.get("/v1/variants").json()["variants"]
    assert v["full"]["model"] == "tiny" and v["full"]["engine"] == "onnxruntime-cpu"
    assert v["small"]["kind"] == "student" and v["small"]["weight"] == 0.5
    assert client.get("/healthz").json() == {"status": "alive"}
    assert client.get("/readyz").json()["variants"] == ["full", "small"]
    for i in range(20):
        recommend(client, user_id=f"c{i}", history=[1001, 1002])
    cmp = client.get("/v1/compare").json()
    assert cmp["reference_variant"] == "full"
    small = cmp["variants"]["small"]
    assert small["ndcg_retention"] == pytest.approx(0.95)
    assert 0 < small["latency"]["p50_s"] <= small["latency"]["p99_s"] < 1.0
    page = client.get("/compare")
    assert page.status_code == 200 and "<svg" in page.text
    assert "src=" not in page.text and "<link" not in page.text  # nothing fetched: works offline


def test_admin_is_disabled_without_a_token(serving_store: Path) -> None:
    with TestClient(create_app(make_settings(serving_store))) as c:
        wait_ready(c)
        r = c.put("/admin/routing", json={"weights": {"full": 1}}, headers=AUTH)
        assert r.status_code == 404 and error_of(r)["code"] == "admin_disabled"


def test_admin_needs_the_right_token_and_counts_failures(client: TestClient) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        r = client.put("/admin/routing", json={"weights": {"full": 1}}, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert "recsys_admin_auth_failures_total 3.0" in client.get("/metrics").text


def test_routing_weights_change_at_run_time(client: TestClient) -> None:
    r = client.put("/admin/routing", json={"weights": {"small": 1}}, headers=AUTH)
    assert r.status_code == 200 and r.json()["weights"] == {"full": 0.0, "small": 1.0}
    assert {recommend(client, user_id=f"w{i}", history=[1001])["variant"] for i in range(30)} == {
        "small"
    }
    r = client.put("/admin/routing", json={"weights": {"ghost": 1}}, headers=AUTH)
    assert r.status_code == 404
    r = client.put("/admin/routing", json={"weights": {"full": 0}}, headers=AUTH)
    assert r.status_code == 422 and "at least one" in error_of(r)["error"]


def test_reload_swaps_the_version_and_a_failed_load_keeps_the_old_one(
    client: TestClient,
) -> None:
    before = recommend(client, history=[1001, 1002], variant="full")
    r = client.post("/admin/reload", json={"variant": "full", "model": "tiny@2"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["version"] == 2
    after = recommend(client, history=[1001, 1002], variant="full")
    assert after["model_version"] == "tiny@2" and after["items"] != before["items"]
    r = client.post("/admin/reload", json={"variant": "full", "model": "tiny@9"}, headers=AUTH)
    assert r.status_code == 409 and "keeps serving" in error_of(r)["error"]
    assert recommend(client, history=[1001], variant="full")["model_version"] == "tiny@2"
    metrics = client.get("/metrics").text
    assert 'recsys_model_info{engine="onnxruntime-cpu",model="tiny",precision="fp32",' \
        'variant="full",version="2"} 1.0' in metrics  # fmt: skip
    assert 'version="1",variant="full"' not in metrics


def test_shadow_traffic_records_agreement(serving_store: Path) -> None:
    settings = make_settings(
        serving_store, weights={"full": 1.0}, shadow_variant="small", shadow_fraction=1.0
    )
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        for i in range(5):
            r = c.post("/v1/recommend", json={"user_id": f"s{i}", "history": [1001]})
            assert r.json()["variant"] == "full"
        want = 'recsys_shadow_agreement_count{candidate="small",variant="full"} 5.0'
        for _ in range(200):  # shadow requests run after the responses: wait for them
            metrics = c.get("/metrics").text
            if want in metrics:
                break
            time.sleep(0.01)
    assert want in metrics
    assert 'recsys_shadow_duration_seconds_count{candidate="small"} 5.0' in metrics


def test_an_unreadable_store_keeps_the_process_alive_but_not_ready(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "missing", load_retry_s=0.05)
    with TestClient(create_app(settings)) as c:
        assert c.get("/healthz").status_code == 200
        for _ in range(500):  # the first load attempt runs in the background: wait for it
            r = c.get("/readyz")
            if "variant 'full'" in error_of(r)["error"]:
                break
            time.sleep(0.01)
        assert r.status_code == 503 and "variant 'full'" in error_of(r)["error"]
        r = c.post("/v1/recommend", json={"user_id": "u", "history": [1]})
        assert r.status_code == 503 and error_of(r)["code"] == "not_ready"
        assert "recsys_ready 0.0" in c.get("/metrics").text


def test_saturated_queues_refuse_before_the_body_is_parsed(client: TestClient) -> None:
    service = client.app.state.service  # type: ignore[attr-defined]
    service.saturated = lambda: True
    r = client.post("/v1/recommend", content=b"{not even json", headers={"content-type":
                    "application/json"})  # fmt: skip
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert error_of(r)["code"] == "overloaded"
    assert client.get("/healthz").status_code == 200  # only recommendations are refused
    assert (
        'recsys_rejected_total{reason="queue_full",variant="none"} 1.0'
        in client.get("/metrics").text
    )
    del service.saturated
    assert recommend(client, history=[1001])["source"] == "model"


def test_a_full_queue_answers_429_with_retry_after(client: TestClient) -> None:
    from app.batching import QueueFullError

    service = client.app.state.service  # type: ignore[attr-defined]
    batcher = service.variants["full"].batcher

    async def full(*args: object, **kwargs: object) -> None:
        raise QueueFullError("full", 2.0)

    batcher.submit = full
    r = client.post("/v1/recommend", json={"user_id": "u", "history": [1001], "variant": "full"})
    assert r.status_code == 429 and r.headers["retry-after"] == "2"
    assert error_of(r)["code"] == "overloaded"
    del batcher.submit


def test_fastapi_native_telemetry_only_when_asked(tmp_path: Path) -> None:
    """Off by default (its per-request provider checks cost the hot path); a setting turns
    it back on for teams that trace with OpenTelemetry."""
    off = create_app(Settings(store=str(tmp_path)))
    on = create_app(Settings(store=str(tmp_path), otel_telemetry=True))
    assert not any(off._telemetry[k] for k in ("tracing", "metrics", "logs"))  # type: ignore[attr-defined]
    assert all(on._telemetry[k] for k in ("tracing", "metrics", "logs"))  # type: ignore[attr-defined]
