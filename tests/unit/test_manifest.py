"""Manifest schema: strict, versioned, round-trips through JSON."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from model_store import Manifest, ManifestError, load_manifest

SHA = "ab" * 32

VALID: dict[str, Any] = {
    "schema_version": 1,
    "name": "sasrec-student",
    "version": 2,
    "created_at": "2024-05-01T12:00:00.000Z",
    "kind": "student",
    "parent": "sasrec-teacher@3",
    "architecture": {"d_model": 64, "n_layers": 2, "dropout": 0.1},
    "recipe": {"lr": 0.001, "epochs": 10, "distill": {"temperature": 2.0}},
    "dataset": {
        "name": "ml-1m",
        "sha256": SHA,
        "n_users": 6040,
        "n_items": 3706,
        "n_interactions": 1000209,
    },
    "signature": {
        "inputs": [{"name": "item_ids", "dtype": "int64", "shape": ["batch", 50]}],
        "outputs": [{"name": "scores", "dtype": "float32", "shape": ["batch", 3706]}],
    },
    "metrics": {"hr@10": 0.71, "ndcg@10": 0.45, "latency_p99_ms": 3},
    "artifacts": {
        "model.onnx": {"format": "onnx", "precision": "fp16", "sha256": SHA, "size_bytes": 10},
        "model.plan": {
            "format": "tensorrt",
            "precision": "int8",
            "sha256": SHA,
            "size_bytes": 12,
            "tensorrt_version": "10.3.0",
            "compute_capability": "9.0",
        },
        "items.json": {"format": "json", "sha256": SHA, "size_bytes": 3},
    },
}


def valid() -> dict[str, Any]:
    return copy.deepcopy(VALID)


def write(tmp_path: Path, data: dict[str, Any] | str) -> Path:
    path = tmp_path / "manifest.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def load_error(tmp_path: Path, data: dict[str, Any] | str) -> str:
    path = write(tmp_path, data)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
    return message


def test_round_trip_to_json_and_load(tmp_path: Path) -> None:
    manifest = Manifest.model_validate(valid())
    path = write(tmp_path, manifest.to_json())
    loaded = load_manifest(path)
    assert loaded == manifest
    assert loaded.artifacts["model.plan"].compute_capability == "9.0"
    assert loaded.artifacts["items.json"].precision == "fp32"  # the default
    assert loaded.signature is not None and loaded.signature.inputs[0].shape == ["batch", 50]


def test_manifest_is_frozen() -> None:
    manifest = Manifest.model_validate(valid())
    with pytest.raises(ValidationError):
        manifest.version = 3  # type: ignore[misc]


def test_unknown_top_level_key_is_named(tmp_path: Path) -> None:
    data = valid()
    data["foo"] = 1
    message = load_error(tmp_path, data)
    assert "unknown key 'foo'" in message
    assert "schema_version 1 allows:" in message and "artifacts" in message


def test_unknown_nested_key_is_named_with_its_allowed_keys(tmp_path: Path) -> None:
    data = valid()
    data["artifacts"]["model.onnx"]["sha1"] = "x"
    message = load_error(tmp_path, data)
    assert "unknown key 'sha1'" in message
    assert "size_bytes" in message  # the keys an artifact allows, not the top level's
    assert "item_mapping" not in message


def test_model_config_is_not_a_key(tmp_path: Path) -> None:
    data = valid()
    data["model_config"] = data.pop("architecture")
    message = load_error(tmp_path, data)
    assert "'model_config'" in message
    assert "more error" in message  # and "architecture" is missing: the count says so


@pytest.mark.parametrize("version", [3, 0, "1", None])  # 2 adds `scorer` (two-stage)
def test_wrong_schema_version_rejected(tmp_path: Path, version: object) -> None:
    data = valid()
    data["schema_version"] = version
    assert "schema_version" in load_error(tmp_path, data)


@pytest.mark.parametrize("field", ["dataset", "name", "metrics", "parent", "created_at"])
def test_missing_field_rejected(tmp_path: Path, field: str) -> None:
    data = valid()
    del data[field]
    message = load_error(tmp_path, data)
    assert f"missing required key '{field}'" in message


def test_missing_nested_field_is_named_with_its_path(tmp_path: Path) -> None:
    data = valid()
    del data["dataset"]["sha256"]
    assert "'dataset.sha256'" in load_error(tmp_path, data)


def test_invalid_json_rejected(tmp_path: Path) -> None:
    assert "JSON" in load_error(tmp_path, '{"schema_version": 1,')


def test_item_mapping_must_be_an_artifact() -> None:
    data = valid()
    del data["artifacts"]["items.json"]
    with pytest.raises(ValidationError, match=r"items\.json"):
        Manifest.model_validate(data)
    data["item_mapping"] = "model.onnx"
    assert Manifest.model_validate(data).item_mapping == "model.onnx"


@pytest.mark.parametrize("name", ["Bad/Name", "bad/name", "", ".hidden", "-x", "UPPER", "a" * 65])
def test_bad_name_rejected(name: str) -> None:
    data = valid()
    data["name"] = name
    with pytest.raises(ValidationError):
        Manifest.model_validate(data)


@pytest.mark.parametrize(
    "parent", ["sasrec-teacher", "sasrec-teacher@latest", "x@0", "Bad@1", "a@1@2", "x@-1", ""]
)
def test_bad_parent_rejected(parent: str) -> None:
    data = valid()
    data["parent"] = parent
    with pytest.raises(ValidationError, match="parent"):
        Manifest.model_validate(data)


def test_parent_may_be_null() -> None:
    data = valid()
    data["parent"] = None
    assert Manifest.model_validate(data).parent is None


@pytest.mark.parametrize("file_name", ["../x", "a/b", "..", ".", "", "a\\b", "manifest.json"])
def test_artifact_names_must_be_plain_file_names(file_name: str) -> None:
    data = valid()
    data["artifacts"][file_name] = data["artifacts"]["model.onnx"]
    with pytest.raises(ValidationError):
        Manifest.model_validate(data)


@pytest.mark.parametrize("sha", ["AB" * 32, "ab" * 31, "zz" * 32, ""])
def test_artifact_sha256_must_be_64_lowercase_hex(sha: str) -> None:
    data = valid()
    data["artifacts"]["model.onnx"]["sha256"] = sha
    with pytest.raises(ValidationError, match="sha256"):
        Manifest.model_validate(data)


def test_unknown_artifact_format_rejected() -> None:
    data = valid()
    data["artifacts"]["model.onnx"]["format"] = "tflite"
    with pytest.raises(ValidationError, match="format"):
        Manifest.model_validate(data)


@pytest.mark.parametrize("stamp", ["2024-05-01T12:00:00", "2024-05-01T14:00:00+02:00", "yesterday"])
def test_created_at_must_be_utc_iso8601(stamp: str) -> None:
    data = valid()
    data["created_at"] = stamp
    with pytest.raises(ValidationError, match="created_at"):
        Manifest.model_validate(data)


def test_types_are_strict() -> None:
    data = valid()
    data["version"] = "2"  # a string is not silently turned into an int
    with pytest.raises(ValidationError, match="version"):
        Manifest.model_validate(data)


def test_non_finite_metric_rejected() -> None:
    # JSON has no NaN: such a manifest could be written but never read back.
    data = valid()
    data["metrics"]["hr@10"] = float("nan")
    with pytest.raises(ValidationError, match="metrics"):
        Manifest.model_validate(data)


def test_manifest_error_is_a_value_error() -> None:
    assert issubclass(ManifestError, ValueError)
