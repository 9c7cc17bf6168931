"""Nothing is ever unpickled from a store or a user's file (DESIGN.md §10).

A crafted pickle whose `__reduce__` would create a marker file is written as
`model.safetensors`, and as the `model.pt` / `model.pt2` of earlier releases, into store
versions with a valid manifest and matching sha256 (published through the store, so
verification passes). Every route that reads a stored checkpoint refuses it with a clear
error, and the marker never appears. A real checkpoint through the same routes works
(the control), and checkpoint headers that do not match their tensors are refused.
"""

from __future__ import annotations

import pickle
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from app.engines import EngineError, TorchEngine, build_engine
from app.model import LoadedModel, ModelLoadError
from compression.configs import DataSpec, ModelConfig, StudentRecipe
from compression.model.prune import PruneConfig
from compression.model.sasrec import SASRec
from compression.model.train import load_checkpoint, save_checkpoint
from compression.pipeline import dataset_info, distill_student, load_from_spec, signature
from compression.variants import export_stored, prune_variant
from model_store.store import CHECKPOINT_FILE, ModelStore
from recsys_cli.main import _torch_module, main

DATA = "synthetic:users=60,items=30,max_len=10,min_len=4,seed=5"
MAX_LEN = 8


class _Marker:
    """Unpickling this creates `path`: what an attacker's payload would do instead."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.path,))


def payload(marker: Path) -> bytes:
    """A pickle shaped like the old checkpoint dict, armed with `marker`."""
    return pickle.dumps({"format": "recsys-sasrec/1", "config": {}, "state_dict": _Marker(marker)})


@pytest.fixture(scope="module")
def armed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ModelStore, Path]]:
    """A store with `good@1` (a real checkpoint), `evil@1` (a pickle as model.safetensors)
    and `legacy@1` (pickles as model.pt and model.pt2); the marker the pickles would touch."""
    root = tmp_path_factory.mktemp("no-pickle")
    marker = root / "PWNED"
    store = ModelStore(root / "store")
    data = load_from_spec(DataSpec(path=DATA))
    cfg = ModelConfig(n_items=data.n_items, max_len=MAX_LEN, hidden=8, n_heads=1, n_blocks=1)
    src = root / "src"
    src.mkdir()
    data.save_item_mapping(src / "items.json")
    torch.manual_seed(0)
    save_checkpoint(src / "good.safetensors", SASRec(cfg))
    (src / "evil").write_bytes(payload(marker))
    common = {
        "kind": "teacher",
        "parent": None,
        "architecture": cfg.model_dump(),
        "recipe": {"data": {"path": DATA}},
        "dataset": dataset_info(data),
        "metrics": {"test_ndcg@10": 0.1},
        "signature": signature(data.n_items),
    }
    items = src / "items.json"
    store.publish(
        "good", {CHECKPOINT_FILE: src / "good.safetensors", "items.json": items}, **common
    )
    store.publish("evil", {CHECKPOINT_FILE: src / "evil", "items.json": items}, **common)
    store.publish(
        "legacy", {"model.pt": src / "evil", "model.pt2": src / "evil", "items.json": items},
        formats={"model.pt2": ("other", "fp32")}, **common,
    )  # fmt: skip
    # The payload is armed: unpickled, it would create a marker (here a throwaway one).
    probe = root / "probe"
    pickle.loads(payload(probe))
    assert probe.exists()
    yield store, marker
    assert not marker.exists(), "a crafted pickle was executed"


def _cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str):
    monkeypatch.setattr(sys, "argv", ["recsys", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


EVIL = "not a usable model checkpoint: not a safetensors file"
LEGACY = "holds only model.pt, a pickle-based"


@pytest.mark.parametrize("kind", ["torch", "auto"])
@pytest.mark.parametrize(
    ("ref", "message"),
    [("evil@1", "not usable weights for this architecture"), ("legacy@1", "re-publish it")],
)
def test_the_service_refuses_a_pickle_in_the_store(armed, ref, message, kind) -> None:
    store, marker = armed
    with pytest.raises(ModelLoadError, match=message):
        LoadedModel(store, ref, kind, 1, [MAX_LEN], torch_factory=_torch_module)
    manifest, folder = store.load(ref)
    artifacts = {k: v.model_dump() for k, v in manifest.artifacts.items()}
    with pytest.raises(EngineError, match=message):
        build_engine(
            folder, artifacts, kind, 1, MAX_LEN, architecture=manifest.architecture,
            torch_factory=_torch_module,
        )  # fmt: skip
    assert not marker.exists()


def test_the_torch_engine_refuses_a_pickle_given_to_it_directly(armed) -> None:
    store, marker = armed
    for ref, name in [("evil@1", CHECKPOINT_FILE), ("legacy@1", "model.pt"),
                      ("legacy@1", "model.pt2")]:  # fmt: skip
        manifest, folder = store.load(ref)
        with pytest.raises(EngineError, match="not usable weights"):
            TorchEngine(folder / name, manifest.architecture, _torch_module, MAX_LEN, "cpu")
    assert not marker.exists()


def test_the_http_service_stays_unready_and_never_runs_the_payload(armed) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import Settings

    store, marker = armed
    settings = Settings(store=str(store.root), variants={"x": "evil@1"}, engine="torch")
    with TestClient(create_app(settings, torch_factory=_torch_module)) as client:
        deadline = time.monotonic() + 20
        while "evil@1" not in (reason := client.get("/readyz").json()["error"]):
            assert time.monotonic() < deadline, reason
            time.sleep(0.02)
        assert client.get("/readyz").status_code == 503
        assert "not usable weights" in reason
    assert not marker.exists()


def test_compression_refuses_a_pickle_on_every_checkpoint_route(armed) -> None:
    store, marker = armed
    _, folder = store.load("evil@1")
    with pytest.raises(ValueError, match=EVIL) as err:
        load_checkpoint(folder / CHECKPOINT_FILE)
    assert str(folder / CHECKPOINT_FILE) in str(err.value)
    _, legacy = store.load("legacy@1")
    for name in ("model.pt", "model.pt2"):  # even handed the old file by path
        with pytest.raises(ValueError, match="not a safetensors file"):
            load_checkpoint(legacy / name)
    for ref, message in [("evil@1", EVIL), ("legacy@1", LEGACY)]:
        with pytest.raises(ValueError, match=message):
            export_stored(store, ref)
        with pytest.raises(ValueError, match=message):
            prune_variant(store, ref, PruneConfig(heads_keep=1))
        recipe = StudentRecipe(name="s", teacher=ref, model={"hidden": 8})
        with pytest.raises(ValueError, match=message):
            distill_student(recipe, store, progress=False, log=lambda _: None)
    assert not marker.exists()


@pytest.mark.parametrize("command", ["evaluate", "export"])
def test_the_cli_refuses_a_pickle_in_one_line(armed, monkeypatch, capsys, command) -> None:
    store, marker = armed
    for ref, message in [("evil@1", EVIL), ("legacy@1", LEGACY)]:
        code, _, err = _cli(monkeypatch, capsys, command, ref, "--store", str(store.root))
        assert code == 2 and message in err and err.count("\n") == 1, err
    assert "re-publish" in err
    assert not marker.exists()


def test_a_real_checkpoint_passes_the_same_routes(armed, monkeypatch, capsys) -> None:
    store, _ = armed
    model = LoadedModel(store, "good@1", "auto", 1, [MAX_LEN], torch_factory=_torch_module)
    assert model.engine.name.startswith("torch-")  # no model.onnx: auto picks the checkpoint
    code, out, err = _cli(monkeypatch, capsys, "evaluate", "good@1", "--store", str(store.root))
    assert code == 0 and "popularity" in out, err


# -- a checkpoint's header must match its tensors -----------------------------------------------


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, str]]:
    torch.manual_seed(0)
    path = tmp_path / CHECKPOINT_FILE
    save_checkpoint(path, SASRec(ModelConfig(n_items=12, max_len=6, hidden=8)))
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    return path, load_file(str(path)), metadata


def _rewrite(path: Path, tensors: dict, metadata: dict) -> None:
    save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t, m: m.update(format="recsys-sasrec/1"), "unknown format tag 'recsys-sasrec/1'"),
        (lambda t, m: m.pop("format"), "unknown format tag None"),
        (lambda t, m: m.pop("config"), "bad model config"),
        (lambda t, m: m.update(config="{not json"), "bad model config"),
        (lambda t, m: m.update(config='{"n_items": 12, "hidden": 8, "evil": 1}'), "evil"),
        (lambda t, m: m.update(config='["n_items"]'), "bad model config"),
        (lambda t, m: t.pop("pos_emb.weight"), "missing ['pos_emb.weight']"),
        (lambda t, m: t.update(extra=torch.zeros(1)), "unexpected ['extra']"),
        (lambda t, m: t.update({"pos_emb.weight": torch.zeros(5, 8)}), "'pos_emb.weight' is"),
        (
            lambda t, m: t.update({"pos_emb.weight": torch.zeros(6, 8, dtype=torch.float64)}),
            "torch.float64",
        ),
    ],
)
def test_a_header_that_does_not_match_its_tensors_is_refused(saved, change, message) -> None:
    path, tensors, metadata = saved
    assert load_checkpoint(path).cfg.max_len == 6  # the unchanged file loads
    change(tensors, metadata)
    _rewrite(path, tensors, metadata)
    with pytest.raises(ValueError, match="not a usable model checkpoint") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and message in str(err.value), str(err.value)
