"""Dockerfile, Dockerfile.gpu, .dockerignore and deploy/ checked without a Docker engine.

What can be checked here: every COPY source exists and survives .dockerignore, base images
carry a version tag, the final stage runs as a non-root user, the HEALTHCHECK command really
answers against the app, the CMD is a working `recsys serve` configured by the image's
RECSYS_* environment, and the CPU serving path never imports PyTorch. Whether the images
build and run is not checked (no Docker engine where these tests run).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = [REPO_ROOT / "Dockerfile", REPO_ROOT / "Dockerfile.gpu"]
DEPLOY = REPO_ROOT / "deploy"


# -- a small Dockerfile reader ------------------------------------------------------------------


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; comments dropped, continuation lines joined."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, f"{path.name}: ends inside a continued instruction"
    return out


def final_stage(path: Path) -> list[tuple[str, str]]:
    steps = instructions(path)
    last_from = max(i for i, (k, _) in enumerate(steps) if k == "FROM")
    return steps[last_from:]


def exec_form(args: str) -> list[str]:
    """The JSON (exec) form of CMD / HEALTHCHECK CMD / COPY, required by these tests."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def env_of(steps: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in steps:
        if keyword == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def copy_sources(path: Path) -> list[str]:
    sources = []
    for keyword, args in instructions(path):
        if keyword not in ("COPY", "ADD"):
            continue
        words = shlex.split(args)
        if any(w.startswith("--from") for w in words):
            continue  # from another stage, not from the build context
        words = [w for w in words if not w.startswith("--")]
        sources += words[:-1]
    return sources


def dockerignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: the last matching pattern wins, `!` re-includes, a pattern
    matching a parent folder excludes what is inside it."""
    parts = Path(rel).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").strip("/")
        pats = {pat, pat.removeprefix("**/")}
        if any(fnmatch.fnmatchcase(c, p) for c in candidates for p in pats) or any(
            fnmatch.fnmatchcase(Path(c).name, pat.removeprefix("**/"))
            for c in candidates
            if pat.startswith("**/")
        ):
            excluded = not negate
    return excluded


def ignore_patterns() -> list[str]:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


# -- the tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_copied_path_exists_and_is_in_the_build_context(dockerfile: Path) -> None:
    patterns = ignore_patterns()
    sources = copy_sources(dockerfile)
    assert sources, f"{dockerfile.name} copies nothing"
    for src in sources:
        assert (REPO_ROOT / src).exists(), f"{dockerfile.name}: COPY {src}: no such path"
        assert not dockerignored(src, patterns), f"{dockerfile.name}: {src} is in .dockerignore"
    # Everything `pip install .` needs: pyproject, its readme, every package it includes.
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    packages = project["tool"]["setuptools"]["packages"]["find"]["include"]
    needed = {"pyproject.toml", project["project"]["readme"]}
    needed |= {p.rstrip("*") for p in packages}
    assert needed <= set(sources), f"{dockerfile.name} does not copy {needed - set(sources)}"


def test_dockerignore_keeps_models_data_git_and_caches_out() -> None:
    patterns = ignore_patterns()
    for path in ["model_store/models/ml1m-teacher/1/model.onnx", ".git/HEAD", "data/x.csv",
                 "app/__pycache__/main.cpython-311.pyc", ".pytest_cache/v", ".venv/bin/python",
                 "recsys_serve.egg-info/PKG-INFO"]:  # fmt: skip
        assert dockerignored(path, patterns), f"{path} would be sent to the build"
    for path in ["model_store/store.py", "app/main.py", "README.md"]:
        assert not dockerignored(path, patterns), f"{path} would be left out of the build"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_are_pinned(dockerfile: Path) -> None:
    stages: set[str] = set()
    for keyword, args in instructions(dockerfile):
        if keyword != "FROM":
            continue
        words = [w for w in args.split() if not w.startswith("--")]
        image = words[0]
        if len(words) == 3 and words[1].upper() == "AS":
            stages.add(words[2])
        if image in stages:
            continue
        assert "$" not in image, f"{dockerfile.name}: FROM {image}: resolve build args here"
        name, _, tag = image.partition("@")[0].rpartition(":")
        assert name and tag and "/" not in tag, f"{dockerfile.name}: FROM {image} has no tag"
        assert tag != "latest" and re.search(r"\d", tag), f"{dockerfile.name}: FROM {image}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_final_stage_runs_as_a_non_root_user(dockerfile: Path) -> None:
    steps = final_stage(dockerfile)
    users = [args for keyword, args in steps if keyword == "USER"]
    assert users, f"{dockerfile.name}: no USER in the final stage"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"{dockerfile.name}: runs as {users[-1]}"
    keywords = [k for k, _ in steps]
    assert keywords.index("USER") < keywords.index("CMD")


def route_paths(routes: list[Any]) -> set[str]:
    """Paths of an app's routes, looking inside included routers."""
    paths = set()
    for route in routes:
        if getattr(route, "path", None):
            paths.add(route.path)
        inner = getattr(route, "original_router", None) or getattr(route, "app", None)
        if inner is not None and hasattr(inner, "routes") and inner is not route:
            paths |= route_paths(list(inner.routes))
    return paths


def healthcheck_command(dockerfile: Path) -> list[str]:
    (args,) = [a for k, a in final_stage(dockerfile) if k == "HEALTHCHECK"]
    return exec_form(args[args.index("CMD") + len("CMD") :].strip())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_healthcheck_hits_a_route_of_the_app_and_passes_against_it(
    dockerfile: Path, tmp_path: Path
) -> None:
    import uvicorn

    from app.main import create_app
    from app.settings import Settings

    cmd = healthcheck_command(dockerfile)
    assert cmd[:2] == ["python", "-c"], "the slim image has no curl: use Python's urllib"
    compile(cmd[2], "HEALTHCHECK", "exec")
    (path,) = re.findall(r"http://127\.0\.0\.1:[^/]+(/[\w/-]*)", cmd[2])
    app = create_app(Settings(variants={}))
    assert path == "/healthz" and path in route_paths(app.routes)

    # Run the exact command against the app, whose only variant cannot load: alive, not ready.
    live = create_app(Settings(variants={"full": "missing@1"}, store=str(tmp_path)))
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(live, host="127.0.0.1", port=port, log_level="error", loop="asyncio")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started, "uvicorn did not start"
        env = {**os.environ, "RECSYS_PORT": str(port)}
        ok = subprocess.run([sys.executable, *cmd[1:]], env=env, capture_output=True, timeout=30)
        assert ok.returncode == 0, ok.stderr.decode()
        env["RECSYS_PORT"] = str(free_port())  # nothing listens there: the check must fail
        bad = subprocess.run([sys.executable, *cmd[1:]], env=env, capture_output=True, timeout=30)
        assert bad.returncode != 0
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_cmd_is_recsys_serve_configured_by_the_image_env(
    dockerfile: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from app.settings import Settings
    from recsys_cli.main import app as cli

    steps = final_stage(dockerfile)
    (cmd_args,) = [a for k, a in steps if k == "CMD"]
    cmd = exec_form(cmd_args)
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert cmd[:2] == ["recsys", "serve"] and "recsys" in scripts
    assert "--workers" not in cmd, "one process per container"
    result = CliRunner().invoke(cli, [*cmd[1:], "--help"])
    assert result.exit_code == 0, result.output
    for flag in (w.split("=")[0] for w in cmd[2:] if w.startswith("--")):
        assert flag in result.output, f"CMD flag {flag} is not an option of recsys serve"

    env = env_of(steps)
    settings_env = {k: v for k, v in env.items() if k.startswith("RECSYS_")}
    assert settings_env["RECSYS_HOST"] == "0.0.0.0", "inside a container, listen on all"
    volumes = [exec_form(a) for k, a in steps if k == "VOLUME"]
    assert [settings_env["RECSYS_STORE"]] in volumes, "the store must be the VOLUME"
    for key in settings_env:
        field = key.removeprefix("RECSYS_").split("__")[0].lower()
        assert field in Settings.model_fields, f"ENV {key} is no setting of app/settings.py"
    for key in [k for k in os.environ if k.startswith("RECSYS_")]:
        monkeypatch.delenv(key)
    for key, value in settings_env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert (settings.host, settings.store) == ("0.0.0.0", settings_env["RECSYS_STORE"])
    exposed = [a for k, a in steps if k == "EXPOSE"]
    assert exposed == [str(settings.port)]


def test_cpu_serving_path_never_imports_torch() -> None:
    """The CPU image has no PyTorch: the app and `recsys serve` must work without it."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from app.main import create_app; from app.settings import Settings\n"
        "import app.engines, app.service, app.model\n"
        "create_app(Settings(variants={}))\n"
        "assert app.engines.local_gpu() is None\n"
        "from typer.testing import CliRunner; from recsys_cli.main import app as cli\n"
        "r = CliRunner().invoke(cli, ['serve', '--help']); assert r.exit_code == 0, r.output\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, cwd=REPO_ROOT)  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_gpu_dockerfile_installs_the_gpu_runtimes_and_says_it_is_untested() -> None:
    text = (REPO_ROOT / "Dockerfile.gpu").read_text()
    assert "UNTESTED" in text
    (base,) = [a for k, a in instructions(REPO_ROOT / "Dockerfile.gpu") if k == "FROM"]
    assert base.startswith(("nvidia/cuda:", "nvcr.io/nvidia/tensorrt:"))
    assert "onnxruntime-gpu==" in text and "pip uninstall -y onnxruntime" in text
    assert "--extra-index-url https://pypi.nvidia.com" in text and "tensorrt" in text
    assert "torch" not in copy_sources(REPO_ROOT / "Dockerfile.gpu")


# -- deploy/compose.yaml and deploy/k8s --------------------------------------------------------


def test_compose_binds_localhost_pins_images_and_mounts_existing_paths() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"app", "prometheus", "grafana"}
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: port {port} not on 127.0.0.1"
        image = svc.get("image", "")
        if name != "app":
            tag = image.rpartition(":")[2]
            assert "/" not in tag and tag != "latest" and re.search(r"\d", tag), image
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith(("./", "../")):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
    app = services["app"]
    assert (DEPLOY / app["build"]["context"] / app["build"]["dockerfile"]).is_file()
    models = [v for v in app["volumes"] if ":/models" in v]
    assert len(models) == 1 and models[0].endswith(":/models:ro")
    assert "RECSYS_ADMIN_TOKEN" not in app["environment"], "an empty token would be valid"
    assert json.loads(app["environment"]["RECSYS_VARIANTS"])

    # Prometheus reads deploy/prometheus as mounted; its target file names the app service.
    prom = services["prometheus"]
    assert "./prometheus:/etc/prometheus:ro" in prom["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    targets = yaml.safe_load((DEPLOY / "prometheus" / "targets" / "recsys.yml").read_text())
    assert targets[0]["targets"] == ["app:8000"]

    # Grafana: the provider reads where compose mounts the dashboards; the datasource is
    # the prometheus service.
    grafana = services["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    prov = DEPLOY / "grafana" / "provisioning"
    provider = yaml.safe_load((prov / "dashboards" / "recsys.yml").read_text())["providers"][0]
    assert mounts[provider["options"]["path"]] == "./grafana/dashboards"
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    (source,) = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["url"] == "http://prometheus:9090" and source["type"] == "prometheus"


def test_k8s_probes_hit_app_routes_and_service_links_are_off() -> None:
    from app.main import create_app
    from app.settings import Settings

    paths = route_paths(create_app(Settings(variants={})).routes)
    docs = [d for f in sorted((DEPLOY / "k8s").glob("*.yaml"))
            for d in yaml.safe_load_all(f.read_text())]  # fmt: skip
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["enableServiceLinks"] is False  # a Service `recsys` would set RECSYS_PORT
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {"/readyz", "/healthz", "/metrics"} <= paths
    assert container["resources"]["requests"] and container["resources"]["limits"]
    (service,) = [d for d in docs if d["kind"] == "Service"]
    assert service["metadata"]["name"] != "recsys"
