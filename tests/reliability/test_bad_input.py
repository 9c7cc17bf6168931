"""Hostile and broken requests: each gets a 4xx whose JSON body names the problem, never a
stack trace, a file path or an internal exception message, and the service keeps serving.

tests/integration/test_api.py covers one example of most classes; this goes deeper: every
type confusion (no coercion), every boundary (exactly at a limit passes, one past fails),
raw ASGI for what an HTTP client will not send (lying or non-numeric Content-Length,
many-chunk bodies without a length), unparsable bodies, and the batch and admin bodies.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.integration.conftest import N_ITEMS
from tests.reliability.conftest import AUTH, TOKEN, make_settings, wait_ready

LIMIT_BYTES = 4096
MAX_HISTORY = 50
JSON = {"content-type": "application/json"}
# Markers of leaked internals: traces, paths, exception types and their raw messages.
LEAKS = (
    "Traceback", 'File "', ".py", "/work", "/tmp", "/root", "site-packages", "pydantic",
    "Error:", "Exception", "RecursionError", "UnicodeDecodeError", "JSONDecodeError",
    "ValueError", "maximum recursion", "codec can't", "integer string conversion", " at 0x",
)  # fmt: skip


@pytest.fixture(scope="module")
def client(rel_store: Path) -> Iterator[TestClient]:
    settings = make_settings(rel_store, admin_token=TOKEN, max_batch_requests=4)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        wait_ready(c)
        yield c


@pytest.fixture(autouse=True)
def still_serves(request: pytest.FixtureRequest) -> Iterator[None]:
    """After every test here, a normal request is answered normally."""
    yield
    if "client" in request.fixturenames:
        c: TestClient = request.getfixturevalue("client")
        r = c.post("/v1/recommend", json={"user_id": "ok", "history": [1001, 1002], "k": 3})
        assert r.status_code == 200 and len(r.json()["items"]) == 3, r.text


def refused(r: Any, status: int, fragment: str, code: str | None = None) -> dict:
    """The response is `status` with a clean JSON error body containing `fragment`."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert isinstance(body["error"], str) and body["error"], body
    assert isinstance(body["code"], str) and body["code"], body
    assert fragment in body["error"], body
    if code is not None:
        assert body["code"] == code, body
    for leak in LEAKS:
        assert leak not in r.text, (leak, r.text)
    return body


def post_raw(client: TestClient, body: bytes, path: str = "/v1/recommend", **headers: str) -> Any:
    return client.post(path, content=body, headers={**JSON, **headers})


# -- malformed and unparsable bodies -----------------------------------------------------------


@pytest.mark.parametrize(
    "body, fragment",
    [
        (b'{"user_id": "u", "history": [1]', "not valid JSON"),
        (b'{"user_id": "u", "history": [1]} trailing', "not valid JSON (trailing characters"),
        (b"{'user_id': 'u', 'history': [1]}", "not valid JSON"),
        (b'{"user_id": "u", "history": [1],}', "not valid JSON"),
        (b'{"user_id": "u", "history": [1]} // comment', "not valid JSON"),
        (b'{"user_id": "u", "history": [01]}', "not valid JSON"),
        (b'{"user_id": "\xff\xfe", "history": [1]}', "not valid JSON (not UTF-8 text)"),
        (b'{"user_id": "caf\xe9", "history": [1]}', "not valid JSON (not UTF-8 text)"),
        (b"[" * 2000 + b"]" * 2000, "not valid JSON (nested too deeply)"),
        (b'{"user_id": "u", "history": ' + b"[" * 1500 + b"]" * 1500 + b"}",
         "not valid JSON (nested too deeply)"),
    ],
)  # fmt: skip
def test_unparsable_bodies_are_422_naming_json(
    client: TestClient, body: bytes, fragment: str
) -> None:
    assert len(body) <= LIMIT_BYTES
    refused(post_raw(client, body), 422, fragment, "invalid_request")


@pytest.mark.parametrize(
    "body, fragment",
    [
        (b"", "body is empty; send a JSON object"),
        (b"null", "body: Input should be an object"),
        (b"1", "body: Input should be an object"),
        (b'"text"', "body: Input should be an object"),
        (b"[]", "body: Input should be an object"),
        (b"{}", "user_id: Field required (and 1 more problems)"),
    ],
)
def test_empty_and_non_object_bodies(client: TestClient, body: bytes, fragment: str) -> None:
    refused(post_raw(client, body), 422, fragment, "invalid_request")


def test_deep_nesting_inside_a_field_is_refused_not_a_crash(client: TestClient) -> None:
    nested = "[" * 400 + "]" * 400
    r = post_raw(client, f'{{"user_id": "u", "history": [1, {nested}]}}'.encode())
    refused(r, 422, "not valid JSON (nested too deeply)")
    obj = '{"a": ' * 300 + "1" + "}" * 300
    r = post_raw(client, f'{{"user_id": {obj}, "history": [1]}}'.encode())
    refused(r, 422, "not valid JSON (nested too deeply)")
    shallow = "[" * 20 + "]" * 20  # within the parser's depth: a plain type error
    r = post_raw(client, f'{{"user_id": "u", "history": [1, {shallow}]}}'.encode())
    refused(r, 422, "history.1: Input should be a valid integer")


# -- wrong types: nothing is coerced -------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, fragment",
    [
        ({"user_id": 42}, "user_id: Input should be a valid string"),
        ({"user_id": ["u"]}, "user_id: Input should be a valid string"),
        ({"user_id": None}, "user_id: Input should be a valid string"),
        ({"user_id": True}, "user_id: Input should be a valid string"),
        ({"history": "1001,1002"}, "history: Input should be a valid array"),
        ({"history": {"0": 1001}}, "history: Input should be a valid array"),
        ({"history": None}, "history: Input should be a valid array"),
        ({"history": 1001}, "history: Input should be a valid array"),
        ({"history": [["1001"]]}, "history.0: Input should be a valid integer"),
        ({"history": [1001, ""]}, "history.1: String should have at least 1 character"),
        ({"history": [True]}, "history.0: Input should be a valid integer"),
        ({"history": [1001.5]}, "history.0: Input should be a valid integer"),
        ({"history": [None]}, "history.0: Input should be a valid integer"),
        ({"k": "3"}, "k: Input should be a valid integer"),
        ({"k": 2.5}, "k: Input should be a valid integer"),
        ({"k": 2.5}, "k: Input should be a valid integer"),
        ({"k": True}, "k: Input should be a valid integer"),
        ({"k": None}, "k: Input should be a valid integer"),
        ({"k": [3]}, "k: Input should be a valid integer"),
        ({"exclude_history": "yes"}, "exclude_history: Input should be a valid boolean"),
        ({"exclude_history": 1}, "exclude_history: Input should be a valid boolean"),
        ({"exclude_history": "true"}, "exclude_history: Input should be a valid boolean"),
        ({"variant": 5}, "variant: Input should be a valid string"),
        ({"variant": ["full"]}, "variant: Input should be a valid string"),
    ],
)
def test_wrong_types_are_refused_not_coerced(
    client: TestClient, fields: dict[str, Any], fragment: str
) -> None:
    body = {"user_id": "u", "history": [1001], **fields}
    refused(client.post("/v1/recommend", json=body), 422, fragment, "invalid_request")


def test_integral_numbers_are_integers_as_json_schema_says(client: TestClient) -> None:
    """JSON Schema's `integer` admits 1001.0, so the server serves it, exactly like 1001."""
    plain = {"user_id": "u", "history": [1001, 1002], "k": 5, "variant": "full"}
    floats = {"user_id": "u", "history": [1001.0, 1002.0], "k": 5.0, "variant": "full"}
    a, b = client.post("/v1/recommend", json=plain), client.post("/v1/recommend", json=floats)
    assert a.status_code == b.status_code == 200, (a.text, b.text)
    assert a.json()["items"] == b.json()["items"] and len(b.json()["items"]) == 5


# -- k -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k, status, fragment, code",
    [
        (0, 422, "k: Input should be greater than or equal to 1", "invalid_request"),
        (-1, 422, "k: Input should be greater than or equal to 1", "invalid_request"),
        (-(2**63), 422, "k: Input should be greater than or equal to 1", "invalid_request"),
        (1001, 422, "k=1001 is above the limit max_k=1000", "k_too_large"),
        (10_001, 422, "k: Input should be less than or equal to 10000", "invalid_request"),
        (2**64, 422, "k: Input should be less than or equal to 10000", "invalid_request"),
    ],
)  # fmt: skip
def test_k_out_of_range(client: TestClient, k: int, status: int, fragment: str, code: str) -> None:
    body = {"user_id": "u", "history": [1001], "k": k, "variant": "full"}
    refused(client.post("/v1/recommend", json=body), status, fragment, code)


def test_k_at_the_catalogue_size_is_served(client: TestClient) -> None:
    body = {"user_id": "u", "history": [], "k": N_ITEMS, "variant": "full"}
    r = client.post("/v1/recommend", json=body)
    assert r.status_code == 200 and len(r.json()["items"]) == N_ITEMS


@pytest.mark.parametrize("history", [[], [1001, 1002]])
def test_k_above_the_catalogue_returns_every_item_left(
    client: TestClient, history: list[int]
) -> None:
    """Schema-valid, so served: the answer holds what the catalogue has (history excluded)."""
    for variant in ("full", "small"):
        body = {"user_id": "u", "history": history, "k": N_ITEMS + 5, "variant": variant}
        r = client.post("/v1/recommend", json=body)
        assert r.status_code == 200, r.text
        items = [i["item_id"] for i in r.json()["items"]]
        assert len(items) == len(set(items)) == N_ITEMS - len(history)
        assert not {str(h) for h in history} & {str(i) for i in items}


# -- history length and ids ----------------------------------------------------------------------


def test_history_at_the_limit_is_served_one_more_is_refused(client: TestClient) -> None:
    history = [1000 + i % N_ITEMS for i in range(MAX_HISTORY)]
    r = client.post("/v1/recommend", json={"user_id": "u", "history": history})
    assert r.status_code == 200, r.text
    r = client.post("/v1/recommend", json={"user_id": "u", "history": [*history, 1001]})
    body = refused(r, 422, f"history has {MAX_HISTORY + 1} items; the limit is {MAX_HISTORY}")
    assert body["code"] == "history_too_long"
    batch = {"requests": [{"user_id": "a", "history": [1001]},
                          {"user_id": "b", "history": [*history, 1001]}]}  # fmt: skip
    refused(client.post("/v1/recommend/batch", json=batch), 422, "limit is 50", "history_too_long")


@pytest.mark.parametrize(
    "item, fragment",
    [
        (-1, "history.0: Input should be greater than or equal to 0"),
        (-(2**63) - 1, "history.0: Input should be greater than or equal to 0"),
        (2**63, "history.0: Input should be less than or equal to 9223372036854775807"),
        (2**64 + 7, "history.0: Input should be less than or equal to 9223372036854775807"),
        (10**300, "history.0: Input should be less than or equal to 9223372036854775807"),
        (1.5, "history.0: Input should be a valid integer"),
        (1e20, "history.0: Input should be less than or equal to 9223372036854775807"),
    ],
)
def test_bad_item_ids(client: TestClient, item: Any, fragment: str) -> None:
    r = client.post("/v1/recommend", json={"user_id": "u", "history": [1001, item][1:]})
    refused(r, 422, fragment, "invalid_request")


def test_the_largest_int64_id_is_just_unknown(client: TestClient) -> None:
    r = client.post("/v1/recommend", json={"user_id": "u", "history": [2**63 - 1, 0, 1001]})
    assert r.status_code == 200 and r.json()["unknown_items"] == 2, r.text


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400"])
def test_nan_and_infinity_literals(client: TestClient, literal: bytes) -> None:
    for template, fragment in (
        (b'{"user_id": "u", "history": [%s]}', "history.0: Input should be a valid integer"),
        (b'{"user_id": "u", "history": [1], "k": %s}', "k: Input should be a valid integer"),
        (b'{"user_id": %s, "history": [1]}', "user_id: Input should be a valid string"),
    ):
        refused(post_raw(client, template % literal), 422, fragment, "invalid_request")
    weights = b'{"weights": {"full": %s, "small": 1}}' % literal
    r = post_raw(client, weights, "/admin/routing", **AUTH)  # PUT below; POST is 405
    assert r.status_code == 405
    r = client.put("/admin/routing", content=weights, headers={**JSON, **AUTH})
    fragment = "weights.full: Input should be"
    refused(r, 422, fragment, "invalid_request")
    assert client.get("/admin/routing", headers=AUTH).json()["weights"] == {
        "full": 0.5,
        "small": 0.5,
    }


def test_weights_whose_sum_overflows_are_refused(client: TestClient) -> None:
    """1e308 + 1e308 is inf: every share became 0 or NaN and all users went to one variant.
    The schema bounds each weight (MAX_WEIGHT), so the sum stays finite."""
    r = client.put("/admin/routing", json={"weights": {"full": 1e308, "small": 1e308}},
                   headers=AUTH)  # fmt: skip
    refused(r, 422, "weights.full: Input should be less than or equal to 1000000",
            "invalid_request")  # fmt: skip
    weights = client.get("/admin/routing", headers=AUTH).json()["weights"]
    assert weights == {"full": 0.5, "small": 0.5}


@pytest.mark.parametrize(
    "weights, fragment",
    [({"full": "1"}, "weights.full: Input should be a valid number"),
     ({"full": True}, "weights.full: Input should be a valid number"),
     ({"full": -1}, "weights.full: Input should be greater than or equal to 0"),
     ({"../x": 1}, "weights.../x.[key]: String should match pattern")],
)  # fmt: skip
def test_bad_routing_weights(client: TestClient, weights: dict, fragment: str) -> None:
    r = client.put("/admin/routing", json={"weights": weights}, headers=AUTH)
    refused(r, 422, fragment, "invalid_request")


# -- variants ------------------------------------------------------------------------------------


def test_unknown_variant_in_the_body_and_in_the_header(client: TestClient) -> None:
    body = {"user_id": "u", "history": [1001]}
    for r in (
        client.post("/v1/recommend", json={**body, "variant": "ghost"}),
        client.post("/v1/recommend", json=body, headers={"X-Variant": "ghost"}),
        client.post(
            "/v1/recommend/batch", json={"requests": [body]}, headers={"X-Variant": "ghost"}
        ),
        client.post("/v1/recommend/batch", json={"requests": [{**body, "variant": "ghost"}]}),
    ):
        refused(r, 404, "unknown variant 'ghost'; known variants: full, small", "unknown_variant")


@pytest.mark.parametrize("name", ["", "../full", "full\n", "a b", "-full", "x" * 65, "ful\u00e9"])
def test_malformed_variant_names(client: TestClient, name: str) -> None:
    body = {"user_id": "u", "history": [1001], "variant": name}
    refused(client.post("/v1/recommend", json=body), 422, "variant: String should", None)
    if name.strip() and "\n" not in name:  # a header value cannot carry these
        r = client.post("/v1/recommend", json={"user_id": "u", "history": [1001]},
                        headers={"X-Variant": name.encode("latin-1")})  # fmt: skip
        refused(r, 422, "header.X-Variant: String should match pattern", "invalid_request")


# -- missing and extra fields ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"history": [1001]}, "user_id: Field required"),
        ({"user_id": "u"}, "history: Field required"),
        ({"user_id": "u", "history": [1], "extra": 1}, "extra: Extra inputs are not permitted"),
        ({"user_id": "u", "history": [1], "User_Id": "v"}, "User_Id: Extra inputs"),
        ({"user_id": "u", "history": [1], "__proto__": {}}, "__proto__: Extra inputs"),
    ],
)
def test_missing_and_extra_fields(client: TestClient, body: dict, fragment: str) -> None:
    refused(client.post("/v1/recommend", json=body), 422, fragment, "invalid_request")


@pytest.mark.parametrize(
    "path, method, body, fragment",
    [
        ("/v1/recommend/batch", "post", {"requests": []}, "requests: List should have at least 1"),
        ("/v1/recommend/batch", "post", {"requests": [{"user_id": "u", "history": [1]}] * 5},
         "5 requests; the limit is 4"),
        ("/v1/recommend/batch", "post", {"requests": [{"user_id": "u", "history": [1], "x": 1}]},
         "requests.0.x: Extra inputs are not permitted"),
        ("/v1/recommend/batch", "post", {"requests": {"user_id": "u"}},
         "requests: Input should be a valid array"),
        ("/admin/reload", "post", {"variant": "full"}, "model: Field required"),
        ("/admin/reload", "post", {"variant": "full", "model": "tiny@1", "force": True},
         "force: Extra inputs are not permitted"),
        ("/admin/reload", "post", {"variant": "full", "model": "../etc/passwd"},
         "model: String should match pattern"),
        ("/admin/reload", "post", {"variant": "full", "model": 2}, "model: Input should be"),
        ("/admin/routing", "put", {"weights": {"full": 1}, "salt": "x"},
         "salt: Extra inputs are not permitted"),
    ],
)  # fmt: skip
def test_batch_and_admin_bodies(
    client: TestClient, path: str, method: str, body: dict, fragment: str
) -> None:
    r = client.request(method.upper(), path, json=body, headers=AUTH)
    refused(r, 422, fragment)


# -- sizes, transfer encodings and content types ---------------------------------------------------


def _big_body(n_bytes: int) -> bytes:
    head = b'{"user_id": "u", "history": ['
    items = b"1," * ((n_bytes - len(head)) // 2)
    return head + items + b"1]}"


def test_oversized_body_with_content_length(client: TestClient) -> None:
    r = post_raw(client, _big_body(LIMIT_BYTES + 10))
    refused(r, 413, f"body over {LIMIT_BYTES} bytes", "body_too_large")
    r = client.post("/v1/recommend/batch", content=_big_body(LIMIT_BYTES * 3), headers=JSON)
    refused(r, 413, f"body over {LIMIT_BYTES} bytes", "body_too_large")


def test_oversized_chunked_body_without_content_length(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        body = _big_body(LIMIT_BYTES * 4)
        for i in range(0, len(body), 500):
            yield body[i : i + 500]

    r = client.post("/v1/recommend", content=chunks(), headers=JSON)
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in r.request.headers
    refused(r, 413, f"body over {LIMIT_BYTES} bytes", "body_too_large")


def test_a_small_body_sent_in_chunks_is_served(client: TestClient) -> None:
    body = json.dumps({"user_id": "u", "history": [1001, 1002], "k": 2}).encode()
    r = client.post("/v1/recommend", content=iter([body[:10], body[10:20], body[20:]]),
                    headers=JSON)  # fmt: skip
    assert r.status_code == 200 and len(r.json()["items"]) == 2


def asgi_call(
    client: TestClient, headers: list[tuple[bytes, bytes]], chunks: list[bytes]
) -> tuple[int, dict, int]:
    """POST /v1/recommend straight through ASGI: (status, JSON body, chunks the app read)."""
    app = client.app
    pending = list(chunks)
    read = 0
    sent: list[dict] = []

    async def receive() -> dict:
        nonlocal read
        if not pending:
            return {"type": "http.disconnect"}
        read += 1
        chunk = pending.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/recommend", "raw_path": b"/v1/recommend",
        "root_path": "", "query_string": b"", "headers": headers,
        "client": ("127.0.0.1", 1), "server": ("testserver", 80), "state": {},
    }  # fmt: skip

    async def call() -> None:
        await app(scope, receive, send)

    client.portal.call(call)  # type: ignore[union-attr]  # the lifespan's event loop
    status = sent[0]["status"]
    payload = b"".join(m.get("body", b"") for m in sent[1:])
    return status, json.loads(payload), read


def test_a_streamed_body_is_refused_as_soon_as_it_passes_the_limit(client: TestClient) -> None:
    """No Content-Length, 100 chunks of 1 kB: refused after reading 5, not all 100."""
    headers = [(b"content-type", b"application/json")]
    status, body, read = asgi_call(client, headers, [b" " * 1000] * 100)
    assert status == 413 and body["code"] == "body_too_large"
    assert read == 5


def test_a_content_length_that_lies_low_is_still_counted(client: TestClient) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", b"20")]
    status, body, read = asgi_call(client, headers, [b" " * 1000] * 10)
    assert status == 413 and body["code"] == "body_too_large" and read == 5


@pytest.mark.parametrize("value", [b"abc", b"-1", b"1e3", b" 12", b"0x10", b""])
def test_a_content_length_that_is_not_a_number(client: TestClient, value: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", value)]
    status, body, read = asgi_call(client, headers, [b'{"user_id": "u", "history": [1]}'])
    assert status == 400 and body == {
        "error": "Content-Length is not a number",
        "code": "bad_content_length",
    }
    assert read == 0


@pytest.mark.parametrize(
    "content_type, shown",
    [
        ("text/plain", "'text/plain'"),
        ("application/x-www-form-urlencoded", "'application/x-www-form-urlencoded'"),
        ("multipart/form-data; boundary=xyz", "'multipart/form-data'"),
        ("application/xml", "'application/xml'"),
        ("application/jsonx", "'application/jsonx'"),
        ("application/problem+json", "'application/problem+json'"),
        ("", "'missing'"),
        (None, "'missing'"),
    ],
)
def test_unsupported_and_missing_content_types(
    client: TestClient, content_type: str | None, shown: str
) -> None:
    headers = {} if content_type is None else {"content-type": content_type}
    for path in ("/v1/recommend", "/v1/recommend/batch", "/admin/reload"):
        r = client.post(path, content=b'{"user_id": "u", "history": [1]}',
                        headers={**headers, **AUTH})  # fmt: skip
        assert "content-type" not in r.request.headers or content_type is not None
        body = refused(r, 415, f"content type {shown}; send application/json")
        assert body["code"] == "unsupported_media_type"


@pytest.mark.parametrize(
    "content_type", ["application/json; charset=utf-8", "Application/JSON", " application/json "]
)
def test_json_content_type_variants_are_accepted(client: TestClient, content_type: str) -> None:
    r = client.post("/v1/recommend", content=b'{"user_id": "u", "history": [1001]}',
                    headers={"content-type": content_type})  # fmt: skip
    assert r.status_code == 200, r.text


def test_a_body_sent_to_a_path_that_takes_none_gets_405_or_404_not_415(
    client: TestClient,
) -> None:
    """The body guard used to answer 415 "send application/json" before the router ran."""
    for method in ("POST", "PUT", "PATCH"):
        for path in ("/healthz", "/readyz", "/metrics", "/v1/variants"):
            r = client.request(method, path, content=b"x", headers={"content-type": "text/plain"})
            refused(r, 405, f"Method Not Allowed: {method} {path}", "method_not_allowed")
    r = client.post("/admin/routing", json={"weights": {"full": 1}}, headers=AUTH)
    refused(r, 405, "Method Not Allowed", "method_not_allowed")
    r = client.post("/v2/nowhere", content=b"x", headers={"content-type": "text/plain"})
    refused(r, 404, "Not Found: POST /v2/nowhere", "not_found")


# -- unicode user ids (valid: served and routed sticky) -------------------------------------------


@pytest.mark.parametrize(
    "user_id",
    ["用户-42", "🙂" * 128, "\u202eevil", "e\u0301", "\u200b", "\u0000", "ü" * 128, "🧑\u200d💻"],
)
def test_unicode_user_ids_are_served_and_sticky(client: TestClient, user_id: str) -> None:
    seen = set()
    for _ in range(3):
        r = client.post("/v1/recommend", json={"user_id": user_id, "history": [1001]})
        assert r.status_code == 200, r.text
        seen.add(r.json()["variant"])
    assert len(seen) == 1


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ('"' + "🙂" * 129 + '"', "user_id: String should have at most 128 characters"),
        ('"' + "a" * 129 + '"', "user_id: String should have at most 128 characters"),
        ('"\\ud800"', "not valid JSON (unexpected end of hex escape"),
        ('"\\udfffx"', "not valid JSON (lone leading surrogate"),
        ('""', "user_id: String should have at least 1 character"),
    ],
)
def test_bad_user_ids(client: TestClient, raw: str, fragment: str) -> None:
    body = f'{{"user_id": {raw}, "history": [1001]}}'.encode()
    refused(post_raw(client, body), 422, fragment, "invalid_request")


# -- a body the limit admits but Python's int parser refuses ---------------------------------------


def test_a_number_with_thousands_of_digits(rel_store: Path) -> None:
    settings = make_settings(rel_store, max_body_bytes=100_000)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        wait_ready(c)
        body = b'{"user_id": "u", "history": [1' + b"0" * 5000 + b"]}"
        refused(post_raw(c, body), 422, "not valid JSON (number out of range", "invalid_request")
        deep = b'{"user_id": "u", "history": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
        refused(post_raw(c, deep), 422, "not valid JSON (nested too deeply)", "invalid_request")
        r = c.post("/v1/recommend", json={"user_id": "u", "history": [1001]})
        assert r.status_code == 200
