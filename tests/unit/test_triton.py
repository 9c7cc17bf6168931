"""compression.export.triton: a Triton model repository from the store, parsed back with Triton's
own protobuf classes (needs `pip install "tritonclient[grpc]"`; skipped without it)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip(
    "tritonclient.grpc.model_config_pb2",
    reason='tritonclient not installed: pip install "tritonclient[grpc]"',
)
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from compression.export.triton import TritonExportError, export_triton
from model_store import ModelStore
from model_store.store import sha256_file
from tests.integration.conftest import N_ITEMS, publish_tiny


def _publish_plan(store: ModelStore, tmp: Path) -> None:
    """A fake TensorRT engine (bytes only: nothing here runs it)."""
    (tmp / "model.plan").write_bytes(b"not really an engine")
    (tmp / "items.json").write_text('{"format": "recsys-item-mapping/1"}')
    store.publish(
        "tiny-trt",
        {"model.plan": tmp / "model.plan", "items.json": tmp / "items.json"},
        kind="tensorrt",
        parent="tiny@1",
        architecture={"n_items": N_ITEMS, "max_len": 8},
        recipe={},
        dataset={"name": "tiny", "sha256": "0" * 64, "n_users": 1, "n_items": N_ITEMS,
                 "n_interactions": 1},
        metrics={},
        formats={"model.plan": ("tensorrt", "fp16")},
        tensorrt={"model.plan": ("10.0.1", "9.0")},
    )  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    s = ModelStore(tmp_path_factory.mktemp("store"))
    publish_tiny(s, "tiny", seed=0)
    publish_tiny(s, "tiny", seed=1)  # the default export takes the latest: version 2
    _publish_plan(s, tmp_path_factory.mktemp("plan"))
    return s


def _config(path: Path) -> pb.ModelConfig:
    return text_format.Parse(path.read_text(), pb.ModelConfig())


def test_default_export_is_a_valid_repository(store: ModelStore, tmp_path: Path) -> None:
    out = tmp_path / "repo"
    written = export_triton(store, None, out, max_batch_size=64)
    assert sorted(p.relative_to(out).as_posix() for p in written) == [
        "tiny-trt/1/model.plan",
        "tiny-trt/config.pbtxt",
        "tiny/2/model.onnx",
        "tiny/config.pbtxt",
    ]
    assert all(p.is_file() for p in written)
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]  # no temporary folder left

    cfg = _config(out / "tiny" / "config.pbtxt")
    assert (cfg.name, cfg.platform, cfg.max_batch_size) == ("tiny", "onnxruntime_onnx", 64)
    (inp,) = cfg.input
    assert (inp.name, inp.data_type, list(inp.dims)) == ("item_ids", pb.TYPE_INT64, [-1])
    (outp,) = cfg.output
    assert (outp.name, outp.data_type, list(outp.dims)) == ("scores", pb.TYPE_FP32, [N_ITEMS + 1])
    assert list(cfg.dynamic_batching.preferred_batch_size) == [8, 16, 32]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 2000
    assert list(cfg.version_policy.specific.versions) == [2]
    (group,) = cfg.instance_group
    assert (group.kind, group.count) == (pb.ModelInstanceGroup.KIND_CPU, 1)
    manifest, _ = store.resolve("tiny@2")
    assert sha256_file(out / "tiny/2/model.onnx") == manifest.artifacts["model.onnx"].sha256

    trt = _config(out / "tiny-trt" / "config.pbtxt")
    assert trt.platform == "tensorrt_plan"
    assert trt.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
    assert list(trt.output[0].dims) == [N_ITEMS + 1]
    assert (out / "tiny-trt/1/model.plan").read_bytes() == b"not really an engine"


def test_explicit_versions_share_one_model(store: ModelStore, tmp_path: Path) -> None:
    out = tmp_path / "repo"
    export_triton(store, ["tiny@1", "tiny@2"], out, max_batch_size=16)
    cfg = _config(out / "tiny" / "config.pbtxt")
    assert list(cfg.version_policy.specific.versions) == [1, 2]
    assert list(cfg.dynamic_batching.preferred_batch_size) == [8, 16]  # 32 > max_batch_size
    assert (out / "tiny/1/model.onnx").is_file() and (out / "tiny/2/model.onnx").is_file()
    assert not (out / "tiny-trt").exists()


def test_refuses_non_empty_out_unless_overwrite(store: ModelStore, tmp_path: Path) -> None:
    out = tmp_path / "repo"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(TritonExportError, match="not empty"):
        export_triton(store, ["tiny"], out)
    assert (out / "keep.txt").is_file()
    export_triton(store, ["tiny"], out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["tiny"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


def test_corrupted_artifact_is_refused(store: ModelStore, tmp_path: Path) -> None:
    s = ModelStore(tmp_path / "store")
    publish_tiny(s, "bad", seed=3)
    _, folder = s.resolve("bad@1")
    with open(folder / "model.onnx", "r+b") as f:
        f.write(b"\0")
    with pytest.raises(TritonExportError, match="sha256"):
        export_triton(s, None, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_cli_unknown_model_exits_2_with_one_line(
    store: ModelStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from recsys_cli.main import main

    argv = ["recsys", "export-triton", "nope", "--store", str(store.root), "--out"]
    monkeypatch.setattr(sys, "argv", [*argv, str(tmp_path / "repo")])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown model 'nope'" in err, err
    assert not (tmp_path / "repo").exists()


def test_cli_writes_repository(
    store: ModelStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from recsys_cli.main import main

    out = tmp_path / "repo"
    argv = ["recsys", "export-triton", "tiny@1", "--store", str(store.root), "--out", str(out)]
    monkeypatch.setattr(sys, "argv", [*argv, "--max-batch-size", "8"])
    main()
    assert f"wrote {out / 'tiny' / 'config.pbtxt'}" in capsys.readouterr().out
    assert _config(out / "tiny" / "config.pbtxt").max_batch_size == 8


def test_missing_tritonclient_names_the_pip_command(
    store: ModelStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tritonclient.grpc", None)  # makes the import fail
    with pytest.raises(TritonExportError, match=r'pip install "tritonclient\[grpc\]"'):
        export_triton(store, None, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()
