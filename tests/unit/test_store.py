"""Model store: versioned publish, resolve, checksum verification, atomicity, concurrency."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from model_store import Manifest, ModelStore, StoreError, load_manifest, sha256_file

DATASET = {
    "name": "ml-1m",
    "sha256": "cd" * 32,
    "n_users": 3,
    "n_items": 4,
    "n_interactions": 12,
}


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, Path]:
    folder = tmp_path / "src"
    folder.mkdir()
    contents = {
        "items.json": json.dumps(["i1", "i2", "i3", "i4"]).encode(),
        "model.onnx": b"onnx-bytes" * 100,
        "model.pt": os.urandom(3000),
        "weights.bin": b"\x00\x01\x02",
    }
    for name, data in contents.items():
        (folder / name).write_bytes(data)
    return {name: folder / name for name in contents}


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "store")


def publish(store: ModelStore, files: dict[str, Path], name: str = "m", **kw: Any) -> Manifest:
    args: dict[str, Any] = {
        "kind": "teacher",
        "parent": None,
        "architecture": {"d_model": 64, "layers": (1, 2)},
        "recipe": {"lr": 0.001},
        "dataset": DATASET,
        "metrics": {"hr@10": 0.5},
    }
    args.update(kw)
    return store.publish(name, files, **args)


def temp_leftovers(store: ModelStore) -> list[Path]:
    return [p for p in store.root.rglob(".tmp-*")] if store.root.exists() else []


def latest_text(store: ModelStore, name: str = "m") -> str:
    return (store.root / name / "latest").read_text().strip()


# -- publish / resolve -------------------------------------------------------------------------


def test_publish_then_resolve(store: ModelStore, sources: dict[str, Path]) -> None:
    first = publish(store, sources)
    assert first.version == 1
    assert latest_text(store) == "1"
    second = publish(store, sources, kind="student", parent="m@1")
    assert second.version == 2
    assert latest_text(store) == "2"

    for ref, version in [("m@1", 1), ("m@2", 2), ("m@latest", 2), ("m", 2)]:
        manifest, folder = store.resolve(ref)
        assert manifest.version == version
        assert folder == store.root / "m" / str(version)
        assert (folder / "model.onnx").read_bytes() == sources["model.onnx"].read_bytes()

    assert store.resolve("m@1")[0] == first  # what publish returned is what was written
    assert store.resolve("m")[0] == second
    assert second.parent == "m@1"
    assert store.versions("m") == [1, 2]


def test_list_and_names(store: ModelStore, sources: dict[str, Path]) -> None:
    assert store.list() == [] and store.names() == []
    publish(store, sources, name="zeta")
    publish(store, sources, name="alpha")
    publish(store, sources, name="zeta")
    assert store.names() == ["alpha", "zeta"]
    assert [(m.name, m.version) for m in store.list()] == [("alpha", 1), ("zeta", 1), ("zeta", 2)]
    assert store.versions("nobody") == []


def test_manifest_records_artifacts(store: ModelStore, sources: dict[str, Path]) -> None:
    manifest = publish(
        store,
        sources | {"model.plan": sources["model.pt"]},
        formats={"model.onnx": ("onnx", "int8")},
        tensorrt={"model.plan": ("10.3.0", "9.0")},
    )
    arts = manifest.artifacts
    assert set(arts) == {"items.json", "model.onnx", "model.pt", "weights.bin", "model.plan"}
    assert (arts["model.onnx"].format, arts["model.onnx"].precision) == ("onnx", "int8")
    assert (arts["model.pt"].format, arts["model.pt"].precision) == ("pytorch", "fp32")
    assert arts["items.json"].format == "json"
    assert arts["weights.bin"].format == "other"
    assert arts["model.plan"].format == "tensorrt"
    assert (arts["model.plan"].tensorrt_version, arts["model.plan"].compute_capability) == (
        "10.3.0",
        "9.0",
    )
    for name, info in arts.items():
        data = (sources | {"model.plan": sources["model.pt"]})[name].read_bytes()
        assert info.sha256 == hashlib.sha256(data).hexdigest()
        assert info.size_bytes == len(data)
    assert manifest.dataset.n_items == 4
    assert manifest.architecture == {"d_model": 64, "layers": [1, 2]}  # as JSON stores it
    assert manifest.created_at.endswith("Z")
    on_disk = load_manifest(store.root / "m" / "1" / "manifest.json")
    assert on_disk == manifest


def test_artifact_path(store: ModelStore, sources: dict[str, Path]) -> None:
    publish(store, sources)
    path = store.artifact_path("m", "model.onnx")
    assert path.read_bytes() == sources["model.onnx"].read_bytes()
    with pytest.raises(StoreError, match=r"model\.plan"):
        store.artifact_path("m@1", "model.plan")


def test_sha256_file_streams_large_files(tmp_path: Path) -> None:
    path = tmp_path / "big"
    data = os.urandom((1 << 20) * 2 + 123)  # crosses block boundaries
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


# -- bad input ---------------------------------------------------------------------------------


def test_missing_items_json_rejected(store: ModelStore, sources: dict[str, Path]) -> None:
    del sources["items.json"]
    with pytest.raises(StoreError, match=r"items\.json"):
        publish(store, sources)
    assert store.names() == []
    assert temp_leftovers(store) == []


@pytest.mark.parametrize("name", ["Bad/Name", "../escape", "", "UPPER"])
def test_bad_name_rejected(store: ModelStore, sources: dict[str, Path], name: str) -> None:
    with pytest.raises(StoreError, match="name"):
        publish(store, sources, name=name)
    assert not store.root.exists() or list(store.root.iterdir()) == []


@pytest.mark.parametrize("parent", ["m", "m@latest", "Bad@1", "m@0"])
def test_bad_parent_rejected(store: ModelStore, sources: dict[str, Path], parent: str) -> None:
    with pytest.raises(StoreError, match="parent"):
        publish(store, sources, parent=parent)
    assert store.names() == []
    assert temp_leftovers(store) == []


@pytest.mark.parametrize("file_name", ["../x.pt", "sub/x.pt", "manifest.json"])
def test_bad_artifact_name_rejected(
    store: ModelStore, sources: dict[str, Path], file_name: str
) -> None:
    with pytest.raises(StoreError):
        publish(store, sources | {file_name: sources["model.pt"]})
    assert store.names() == []
    assert not (store.root.parent / "x.pt").exists()


def test_bad_format_override_rejected(store: ModelStore, sources: dict[str, Path]) -> None:
    with pytest.raises(StoreError, match="tflite"):
        publish(store, sources, formats={"model.onnx": ("tflite", "fp32")})
    with pytest.raises(StoreError, match=r"nope\.onnx"):
        publish(store, sources, formats={"nope.onnx": ("onnx", "fp32")})
    assert store.names() == []


def test_non_json_architecture_rejected(store: ModelStore, sources: dict[str, Path]) -> None:
    with pytest.raises(StoreError, match="architecture"):
        publish(store, sources, architecture={"act": object()})
    assert store.names() == []


# -- resolve errors ----------------------------------------------------------------------------


def test_unknown_name_lists_known_names(store: ModelStore, sources: dict[str, Path]) -> None:
    publish(store, sources, name="alpha")
    publish(store, sources, name="beta")
    with pytest.raises(StoreError, match="'gamma'") as info:
        store.resolve("gamma@1")
    assert "alpha, beta" in str(info.value)


def test_unknown_version_lists_known_versions(store: ModelStore, sources: dict[str, Path]) -> None:
    publish(store, sources)
    publish(store, sources)
    with pytest.raises(StoreError, match="no version 7") as info:
        store.load("m@7")
    assert "1, 2" in str(info.value)


@pytest.mark.parametrize("ref", ["", "m@", "m@0", "m@01", "m@x", "M", "m@1@2", "@1", "a/b@1"])
def test_malformed_ref_rejected(store: ModelStore, sources: dict[str, Path], ref: str) -> None:
    publish(store, sources)
    with pytest.raises(StoreError, match="malformed"):
        store.resolve(ref)


def test_latest_file_is_the_pointer(store: ModelStore, sources: dict[str, Path]) -> None:
    publish(store, sources)
    publish(store, sources)
    (store.root / "m" / "latest").write_text("1\n")  # a rollback
    assert store.resolve("m")[0].version == 1
    (store.root / "m" / "latest").write_text("9\n")
    with pytest.raises(StoreError, match="latest"):
        store.resolve("m@latest")
    # A publisher that died after its rename but before writing `latest`: newest wins.
    (store.root / "m" / "latest").unlink()
    assert store.resolve("m")[0].version == 2


def test_stale_temp_folders_are_ignored(store: ModelStore, sources: dict[str, Path]) -> None:
    publish(store, sources)
    stale = store.root / ".tmp-deadbeef"
    stale.mkdir()
    (stale / "manifest.json").write_text("{}")
    (store.root / "m" / ".tmp-cafe").write_text("3\n")
    assert store.names() == ["m"]
    assert store.versions("m") == [1]
    assert [m.version for m in store.list()] == [1]
    assert publish(store, sources).version == 2


# -- checksums ---------------------------------------------------------------------------------


def test_load_verifies_intact_version(store: ModelStore, sources: dict[str, Path]) -> None:
    published = publish(store, sources)
    manifest, folder = store.load("m")
    assert manifest == published
    assert folder == store.root / "m" / "1"


def test_tampered_byte_detected(store: ModelStore, sources: dict[str, Path]) -> None:
    publish(store, sources)
    path = store.artifact_path("m", "model.onnx")
    data = bytearray(path.read_bytes())
    data[5] ^= 0xFF  # same size, different content
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"model\.onnx"):
        store.load("m")
    manifest, _ = store.load("m", verify=False)  # still resolvable without the check
    assert manifest.version == 1


def test_truncated_artifact_detected(store: ModelStore, sources: dict[str, Path]) -> None:
    publish(store, sources)
    path = store.artifact_path("m", "model.pt")
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(StoreError, match=r"model\.pt"):
        store.load("m@1")
    assert store.load("m@1", verify=False)[0].version == 1


def test_deleted_artifact_detected(store: ModelStore, sources: dict[str, Path]) -> None:
    publish(store, sources)
    store.artifact_path("m", "items.json").unlink()
    with pytest.raises(StoreError, match=r"items\.json"):
        store.load("m")
    assert store.load("m", verify=False)[0].version == 1


def test_unexpected_extra_file_detected(store: ModelStore, sources: dict[str, Path]) -> None:
    publish(store, sources)
    (store.root / "m" / "1" / "evil.so").write_bytes(b"x")
    with pytest.raises(StoreError, match=r"evil\.so"):
        store.load("m")


def test_corrupt_manifest_reported(store: ModelStore, sources: dict[str, Path]) -> None:
    publish(store, sources)
    (store.root / "m" / "1" / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match=r"manifest\.json"):
        store.resolve("m@1")


# -- atomicity ---------------------------------------------------------------------------------


def assert_untouched(store: ModelStore) -> None:
    assert store.versions("m") == [1]
    assert latest_text(store) == "1"
    assert temp_leftovers(store) == []
    assert sorted(p.name for p in (store.root / "m").iterdir()) == ["1", "latest"]


def test_missing_source_leaves_no_trace(store: ModelStore, sources: dict[str, Path]) -> None:
    publish(store, sources)
    files = sources | {"model.plan": sources["model.pt"].parent / "does-not-exist.plan"}
    with pytest.raises(StoreError, match="does-not-exist"):
        publish(store, files)
    assert_untouched(store)


def test_failure_midway_through_copies_leaves_no_trace(
    store: ModelStore, sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(store, sources)
    real_fsync, calls = os.fsync, []

    def failing_fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:  # the first artifact is copied and synced; the disk then fails
            raise OSError(errno.EIO, "simulated I/O error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="simulated"):
        publish(store, sources)
    monkeypatch.undo()
    assert_untouched(store)
    assert store.load("m")[0].version == 1


def test_failed_rename_leaves_no_trace(
    store: ModelStore, sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(store, sources)

    def failing_rename(src: object, dst: object) -> None:
        raise OSError(errno.EIO, "simulated crash at rename")

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="simulated"):
        publish(store, sources)
    monkeypatch.undo()
    assert_untouched(store)


def test_failed_first_publish_leaves_no_version(
    store: ModelStore, sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_rename(src: object, dst: object) -> None:
        raise OSError(errno.EIO, "simulated crash at rename")

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError):
        publish(store, sources)
    monkeypatch.undo()
    assert store.names() == []
    assert temp_leftovers(store) == []
    with pytest.raises(StoreError, match="unknown model"):
        store.resolve("m")


# -- concurrency -------------------------------------------------------------------------------


def run_threads(n: int, target: Any) -> list[Any]:
    results: list[Any] = [None] * n

    def run(i: int) -> None:
        try:
            results[i] = target()
        except BaseException as exc:  # reported by the assertion below
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def test_concurrent_publish_collision_takes_next_version(
    store: ModelStore, sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Hold both publishers at their first rename: both have picked version 1, so one must lose
    # the race and retry with version 2.
    real_rename, barrier = os.rename, threading.Barrier(2, timeout=20)
    waited: set[int] = set()

    def racing_rename(src: Any, dst: Any) -> None:
        if threading.get_ident() not in waited:
            waited.add(threading.get_ident())
            barrier.wait()
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", racing_rename)
    results = run_threads(2, lambda: publish(store, sources))
    monkeypatch.undo()

    assert all(isinstance(r, Manifest) for r in results), results
    assert sorted(r.version for r in results) == [1, 2]
    assert store.versions("m") == [1, 2]
    assert latest_text(store) == "2"
    for version in (1, 2):
        assert store.load(f"m@{version}")[0].version == version
    assert temp_leftovers(store) == []


def test_slow_older_publisher_cannot_leave_latest_behind(
    store: ModelStore, sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Force the worst interleaving: the publisher of version 1 writes `latest` = 1 only after the
    # publisher of version 2 has finished writing `latest` = 2.
    real_rename, real_replace = os.rename, os.replace
    older_at_latest, newer_done = threading.Event(), threading.Event()

    def ordered_rename(src: Any, dst: Any) -> None:
        if Path(dst).name == "2":
            older_at_latest.wait(timeout=20)  # version 1's publisher has chosen "1" for latest
        real_rename(src, dst)

    def ordered_replace(src: Any, dst: Any) -> None:
        stale = Path(dst).name == "latest" and Path(src).read_text().strip() == "1"
        if stale and not older_at_latest.is_set():
            older_at_latest.set()
            newer_done.wait(timeout=20)
        real_replace(src, dst)
        if Path(dst).name == "latest" and not stale:
            newer_done.set()

    monkeypatch.setattr(os, "rename", ordered_rename)
    monkeypatch.setattr(os, "replace", ordered_replace)
    results = run_threads(2, lambda: publish(store, sources))
    monkeypatch.undo()

    assert all(isinstance(r, Manifest) for r in results), results
    assert older_at_latest.is_set() and newer_done.is_set()  # the interleaving did happen
    assert latest_text(store) == "2"
    assert store.resolve("m")[0].version == 2


def test_many_concurrent_publishers(store: ModelStore, sources: dict[str, Path]) -> None:
    results = run_threads(4, lambda: publish(store, sources))
    assert all(isinstance(r, Manifest) for r in results), results
    assert sorted(r.version for r in results) == [1, 2, 3, 4]
    assert [m.version for m in store.list()] == [1, 2, 3, 4]
    assert all(store.load(f"m@{v}") for v in range(1, 5))
    assert latest_text(store) == "4"
