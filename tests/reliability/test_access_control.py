"""Admin access control and unsafe deserialization.

- Every admin endpoint needs `Authorization: Bearer <token>`; anything else is a counted
  401 with `WWW-Authenticate: Bearer` and no side effect; the comparison is
  `hmac.compare_digest`; with no token configured the endpoints are 404, never open.
- The token never leaves the process: not in a response, a log line, /v1/variants or
  /metrics.
- No pickle: `app/` and `model_store/` never import pickle-family modules, torch is
  imported only lazily inside `app/engines.py`, and nothing in `app/`, `model_store/`,
  `compression/`, `recsys_cli/` or `benchmarks/` calls an unpickling loader (`pickle.load(s)`,
  `torch.load`, `torch.export.load`, `joblib.load`, `numpy.load(allow_pickle=True)`, ...) or
  imports dill / cloudpickle: an AST walk that resolves import aliases. What the code does
  with a crafted pickle is tested in `test_no_pickle.py`.
"""

from __future__ import annotations

import ast
import hmac
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

import app.api
from app.main import create_app
from tests.conftest import REPO_ROOT
from tests.reliability.conftest import AUTH, TOKEN, make_settings, wait_ready

ADMIN_CALLS = [
    ("GET", "/admin/routing", None),
    ("PUT", "/admin/routing", {"weights": {"small": 1.0}}),
    ("POST", "/admin/reload", {"variant": "full", "model": "tiny@2"}),
]
BAD_AUTHORIZATION = {
    "missing": None,
    "empty": "",
    "scheme only": "Bearer",
    "scheme and space": "Bearer ",
    "no scheme": TOKEN,
    "basic scheme": f"Basic {TOKEN}",
    "token scheme": f"Token {TOKEN}",
    "wrong token": "Bearer not-the-token-at-all-123",
    "prefix": f"Bearer {TOKEN[:-1]}",
    "first half": f"Bearer {TOKEN[: len(TOKEN) // 2]}",
    "extended": f"Bearer {TOKEN}x",
    "upper case": f"Bearer {TOKEN.upper()}",
    "two spaces": f"Bearer  {TOKEN}",
    "trailing space": f"Bearer {TOKEN} ",
    "trailing tab": f"Bearer {TOKEN}\t",
    "leading space": f" Bearer {TOKEN}",
    "tab separator": f"Bearer\t{TOKEN}",
    "repeated": f"Bearer {TOKEN}, Bearer {TOKEN}",
    "latin-1 junk": "Bearer \xe9\xff" + TOKEN,
    "over-long": "Bearer " + TOKEN * 40,
}


@pytest.fixture
def client(rel_store: Path) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(rel_store, admin_token=TOKEN))) as c:
        wait_ready(c)
        yield c


def failures(client: TestClient) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("recsys_admin_auth_failures_total "):
            return float(line.split()[1])
    raise AssertionError("recsys_admin_auth_failures_total not exported")


def call(client: TestClient, method: str, path: str, body: Any, authorization: str | None) -> Any:
    headers = {} if authorization is None else {"Authorization": authorization.encode("latin-1")}
    return client.request(method, path, json=body, headers=headers)


@pytest.mark.parametrize("method, path, body", ADMIN_CALLS)
def test_every_admin_call_needs_the_exact_bearer_token(
    client: TestClient, method: str, path: str, body: Any
) -> None:
    before = client.get("/admin/routing", headers=AUTH).json()
    for n, (what, authorization) in enumerate(BAD_AUTHORIZATION.items(), start=1):
        r = call(client, method, path, body, authorization)
        assert r.status_code == 401, (what, r.status_code, r.text)
        assert r.headers["www-authenticate"] == "Bearer", what
        assert r.json() == {"error": "missing or wrong bearer token", "code": "unauthorized"}
        assert failures(client) == n, what
    # No side effect: the split is unchanged and "full" still serves version 1.
    assert client.get("/admin/routing", headers=AUTH).json() == before
    r = client.post("/v1/recommend", json={"user_id": "u", "history": [1], "variant": "full"})
    assert r.json()["model_version"] == "tiny@1"
    # The right token works, and successes are not counted as failures.
    r = call(client, method, path, body, f"Bearer {TOKEN}")
    assert r.status_code == 200, r.text
    assert failures(client) == len(BAD_AUTHORIZATION)


def test_a_wrong_token_is_refused_before_the_body_is_validated(client: TestClient) -> None:
    """An unauthenticated caller learns nothing about the body schema (401, not 422)."""
    r = client.put("/admin/routing", json={"nope": 1})
    assert r.status_code == 401
    r = client.post("/admin/reload", json={"variant": "../x"}, headers={"Authorization": "x"})
    assert r.status_code == 401
    assert failures(client) == 2


def test_the_token_is_compared_with_hmac_compare_digest(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(app.api.hmac, "compare_digest", recording)
    assert client.get("/admin/routing", headers=AUTH).status_code == 200
    assert client.get("/admin/routing", headers={"Authorization": "Bearer nope"}).status_code == 401
    prefix = {"Authorization": f"Bearer {TOKEN[:4]}"}
    assert client.get("/admin/routing", headers=prefix).status_code == 401
    assert calls == [
        (TOKEN.encode(), TOKEN.encode()),
        (b"nope", TOKEN.encode()),
        (TOKEN[:4].encode(), TOKEN.encode()),
    ]
    # compare_digest alone decides: told "no", even the right token is refused ...
    monkeypatch.setattr(app.api.hmac, "compare_digest", lambda a, b: False)
    assert client.get("/admin/routing", headers=AUTH).status_code == 401
    # ... and no other comparison of the secret exists in the module.
    source = Path(app.api.__file__).read_text()
    assert "get_secret_value()" in source and source.count("get_secret_value()") == 1
    assert "== expected" not in source and "expected ==" not in source


@pytest.mark.parametrize("authorization", [None, f"Bearer {TOKEN}", "Bearer ", "Bearer x" * 100])
def test_admin_is_404_when_no_token_is_configured(rel_store: Path, authorization: Any) -> None:
    with TestClient(create_app(make_settings(rel_store))) as c:
        wait_ready(c)
        for method, path, body in ADMIN_CALLS:
            r = call(c, method, path, body, authorization)
            assert r.status_code == 404, r.text
            assert r.json()["code"] == "admin_disabled"
        assert c.get("/v1/variants").json()["variants"]["full"]["weight"] == 0.5


@pytest.mark.parametrize("token", ["", " " * 3, "short-token"])
def test_an_empty_or_short_token_is_refused_at_start(rel_store: Path, token: str) -> None:
    with pytest.raises(ValueError, match="admin_token"):
        make_settings(rel_store, admin_token=token)


def test_the_token_never_leaves_the_process(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    secret_parts = {TOKEN, TOKEN[: len(TOKEN) // 2 + 1], TOKEN[len(TOKEN) // 2 - 1 :]}
    seen: list[str] = []
    with caplog.at_level(logging.DEBUG):
        for method, path, body in ADMIN_CALLS:
            for authorization in (f"Bearer {TOKEN}", f"Bearer {TOKEN}x", TOKEN, None):
                r = call(client, method, path, body, authorization)
                seen += [r.text, str(r.headers)]
        for bad in ({"variant": "full", "model": "tiny@9"}, {"variant": "ghost", "model": "t"}):
            r = client.post("/admin/reload", json=bad, headers=AUTH)
            assert r.status_code in (404, 409)
            seen.append(r.text)
        for path in ("/v1/variants", "/metrics", "/readyz", "/healthz", "/v1/compare",
                     "/compare", "/openapi.json", "/docs"):  # fmt: skip
            r = client.get(path)
            assert r.status_code == 200, path
            seen += [r.text, str(r.headers)]
        settings = client.app.state.service.settings  # type: ignore[attr-defined]
        seen += [repr(settings), str(settings), settings.model_dump_json()]
    seen += [record.getMessage() for record in caplog.records]
    seen.append(caplog.text)
    assert any("reload to tiny@9 refused" in text for text in seen)  # logging was captured
    for text in seen:
        for part in secret_parts:
            assert part not in text, text[:300]


# -- no pickle, no torch.load without weights_only -------------------------------------------------

PICKLE_FAMILY = {
    "pickle",
    "cPickle",
    "_pickle",
    "dill",
    "cloudpickle",
    "joblib",
    "shelve",
    "marshal",
}


def _sources(*folders: str) -> Iterator[tuple[Path, ast.Module]]:
    for folder in folders:
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            yield path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _imports(tree: ast.Module) -> Iterator[tuple[str, ast.AST]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], node
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module.split(".")[0], node


def _calls(tree: ast.Module, owner: set[str], attr: str) -> Iterator[ast.Call]:
    """Calls `x.attr(...)` where x is a name in `owner` (e.g. torch.load, np.load)."""
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == attr
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id in owner
        ):
            yield node


def _keyword(call: ast.Call, name: str) -> Any:
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else kw.value
    return None


def test_the_serving_side_never_imports_a_pickle_family_module() -> None:
    found = [
        f"{path.relative_to(REPO_ROOT)}:{node.lineno} imports {module}"
        for path, tree in _sources("app", "model_store")
        for module, node in _imports(tree)
        if module in PICKLE_FAMILY
    ]
    assert found == []
    for path, tree in _sources("app", "model_store"):
        for call in _calls(tree, {"np", "numpy"}, "load"):
            assert _keyword(call, "allow_pickle") in (None, False), f"{path}:{call.lineno}"


def _enclosing_functions(tree: ast.Module) -> dict[ast.AST, str]:
    owner: dict[ast.AST, str] = {}
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            for node in ast.walk(fn):
                owner.setdefault(node, fn.name)
    return owner


def test_app_imports_torch_only_lazily_in_engines_and_never_torch_loads() -> None:
    torch_imports = []
    for path, tree in _sources("app"):
        owner = _enclosing_functions(tree)
        for module, node in _imports(tree):
            if module == "torch":
                torch_imports.append((path.name, owner.get(node)))
    assert torch_imports, "the scan found no torch import at all: it is not looking right"
    for file, function in torch_imports:
        assert file == "engines.py", file  # the CPU service never needs PyTorch
        assert function is not None, "a module-level torch import would load torch at start"
    assert ("engines.py", "__init__") in torch_imports  # TorchEngine and TensorRTEngine


# Calls that unpickle (or run a pickle-based archive), by their fully qualified name.
UNPICKLING_CALLS = {
    *(
        f"{m}.{f}"
        for m in ("pickle", "_pickle", "cPickle", "dill", "cloudpickle")
        for f in ("load", "loads", "Unpickler")
    ),
    "torch.load",
    "torch.serialization.load",
    "torch.export.load",
    "torch.jit.load",
    "torch.package.PackageImporter",
    "joblib.load",
    "pandas.read_pickle",
    "shelve.open",
    "marshal.load",
    "marshal.loads",
}
BANNED_IMPORTS = {"dill", "cloudpickle"}
SCANNED = ("app", "model_store", "compression", "recsys_cli", "benchmarks")


def _qualified_names(tree: ast.AST) -> dict[str, str]:
    """Local name -> what it was imported as, from every import in the file (lazy ones too):
    `import numpy as np` gives np -> numpy, `from torch.export import load` load ->
    torch.export.load."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    names[alias.asname] = alias.name
                else:
                    head = alias.name.split(".")[0]
                    names[head] = head
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and (base := _dotted(node.value)):
        return f"{base}.{node.attr}"
    return None


def unpickling_paths(source: str, filename: str = "<code>") -> list[str]:
    """Every unpickling call and banned import in `source`, as "line: what"."""
    tree = ast.parse(source, filename=filename)
    names = _qualified_names(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [
                node.module or ""
            ]  # fmt: skip
            found += [f"{node.lineno}: imports {m}" for m in modules
                      if m.split(".")[0] in BANNED_IMPORTS]  # fmt: skip
        if not isinstance(node, ast.Call) or (dotted := _dotted(node.func)) is None:
            continue
        head, _, rest = dotted.partition(".")
        qualified = ".".join(filter(None, (names.get(head, head), rest)))
        if qualified in UNPICKLING_CALLS:
            found.append(f"{node.lineno}: calls {qualified}")
        elif qualified in ("numpy.load", "numpy.lib.npyio.load"):
            allow = _keyword(node, "allow_pickle")
            if allow not in (None, False) or any(k.arg is None for k in node.keywords):
                found.append(f"{node.lineno}: calls {qualified} without allow_pickle=False")
    return found


@pytest.mark.parametrize(
    "source",
    [
        "import torch\ntorch.load(p, weights_only=True)",
        "import torch.export\ntorch.export.load(p)",
        "from torch.export import load as read\nread(p)",
        "from torch import export\nexport.load(p)",
        "import pickle as pk\npk.loads(b)",
        "from pickle import Unpickler\nUnpickler(f).load()",
        "import numpy as np\nnp.load(p, allow_pickle=True)",
        "from numpy import load\nload(p, **kw)",
        "import joblib\njoblib.load(p)",
        "import pandas as pd\npd.read_pickle(p)",
        "def f():\n    import dill\n",
        "from cloudpickle import dumps",
    ],
)
def test_the_scan_finds_unpickling_however_it_is_spelled(source: str) -> None:
    assert unpickling_paths(source), source


def test_the_scan_passes_safe_loaders() -> None:
    safe = (
        "import numpy as np, json, tomllib\nnp.load(p)\nnp.load(p, allow_pickle=False)\n"
        "json.loads(s)\ntomllib.load(f)\n"
        "from safetensors.torch import load_file\nload_file(p)\nimport onnx\nonnx.load(p)\n"
    )
    assert unpickling_paths(safe) == []


def test_nothing_in_the_code_base_unpickles() -> None:
    found = [
        f"{path.relative_to(REPO_ROOT)}:{hit}"
        for folder in SCANNED
        for path in sorted((REPO_ROOT / folder).rglob("*.py"))
        for hit in unpickling_paths(path.read_text(encoding="utf-8"), str(path))
    ]
    assert found == []
