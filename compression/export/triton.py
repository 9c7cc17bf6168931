"""Export stored ONNX models and TensorRT engines as a Triton Inference Server model repository.

Layout written (Triton's "model repository")::

    <out>/<name>/config.pbtxt
    <out>/<name>/<version>/model.onnx      (platform onnxruntime_onnx, KIND_CPU)
    <out>/<name>/<version>/model.plan      (platform tensorrt_plan, KIND_GPU)

config.pbtxt is built with Triton's own protobuf message (`tritonclient.grpc.model_config_pb2`)
and printed with `google.protobuf.text_format`, so every field name and enum is one Triton knows.
Artifacts are copied from versions whose sha256 checks pass (`ModelStore.load(verify=True)`);
the whole repository is assembled in a temporary sibling folder and renamed into place, so a
failed export never leaves a half-written repository behind.

A TensorRT engine only runs on the TensorRT version and GPU generation it was built for (the
manifest's `tensorrt_version` and `compute_capability`), and only up to the largest batch of its
optimization profiles: keep `max_batch_size` within it.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_store.manifest import Manifest
from model_store.store import ModelStore, StoreError, sha256_file

INPUT_NAME = "item_ids"
OUTPUT_NAME = "scores"
PIP_HINT = 'pip install "tritonclient[grpc]"'
# Model file -> (Triton platform, manifest format, instance kind); ONNX wins when both exist.
_PLATFORMS = {
    "model.onnx": ("onnxruntime_onnx", "onnx", "KIND_CPU"),
    "model.plan": ("tensorrt_plan", "tensorrt", "KIND_GPU"),
}


class TritonExportError(ValueError):
    """An export that cannot proceed; one line naming the problem and the fix."""


@dataclass(frozen=True)
class _Variant:
    name: str
    version: int
    folder: Path
    file: str  # "model.onnx" or "model.plan"
    sha256: str
    n_scores: int  # n_items + 1 (index 0 is padding)

    @property
    def platform(self) -> str:
        return _PLATFORMS[self.file][0]


def _model_config_pb2() -> Any:
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise TritonExportError(
            f"Triton export needs the tritonclient package ({exc}); install it with: {PIP_HINT}"
        ) from None
    return model_config_pb2


def _model_file(manifest: Manifest) -> str | None:
    for file, (_, fmt, _) in _PLATFORMS.items():
        info = manifest.artifacts.get(file)
        if info is not None and info.format == fmt:
            return file
    return None


def _n_scores(manifest: Manifest) -> int:
    ref = f"{manifest.name}@{manifest.version}"
    if manifest.signature is not None:
        for out in manifest.signature.outputs:
            if out.name == OUTPUT_NAME and out.shape and isinstance(out.shape[-1], int):
                return out.shape[-1]
    n_items = manifest.architecture.get("n_items")
    if isinstance(n_items, bool) or not isinstance(n_items, int) or n_items < 1:
        raise TritonExportError(
            f"{ref}: architecture has no positive integer n_items (got {n_items!r}), so the "
            f"size of {OUTPUT_NAME!r} is unknown; republish it with n_items"
        )
    return n_items + 1


def _select(store: ModelStore, refs: Sequence[str] | None) -> list[_Variant]:
    explicit = refs is not None
    if not explicit:
        names = store.names()
        if not names:
            what = "is not a folder" if not store.root.is_dir() else "holds no models"
            raise TritonExportError(f"model store {store.root} {what}; check --store")
        refs = [f"{name}@latest" for name in names]
    selected: list[_Variant] = []
    for ref in refs:
        try:
            manifest, folder = store.resolve(ref)
        except StoreError as exc:
            raise TritonExportError(str(exc)) from None
        file = _model_file(manifest)
        if file is None:
            if explicit:
                raise TritonExportError(
                    f"{manifest.name}@{manifest.version} has neither an ONNX model.onnx nor a "
                    f"TensorRT model.plan (it has: {', '.join(sorted(manifest.artifacts))}); "
                    f"export one first (recsys export)"
                )
            continue  # the default selection skips PyTorch-only versions
        try:
            store.load(f"{manifest.name}@{manifest.version}", verify=True)
        except StoreError as exc:
            raise TritonExportError(str(exc)) from None
        selected.append(
            _Variant(
                manifest.name,
                manifest.version,
                folder,
                file,
                manifest.artifacts[file].sha256,
                _n_scores(manifest),
            )
        )
    if not selected:
        raise TritonExportError(
            f"no stored model in {store.root} has a model.onnx or model.plan; run recsys export"
        )
    return selected


def _group(variants: list[_Variant]) -> dict[str, list[_Variant]]:
    """Versions of one name share one Triton model, so they must agree on platform and shape."""
    groups: dict[str, list[_Variant]] = {}
    for v in variants:
        group = groups.setdefault(v.name, [])
        if any(g.version == v.version for g in group):
            raise TritonExportError(f"{v.name}@{v.version} is selected twice; name it once")
        if group and (group[0].platform, group[0].n_scores) != (v.platform, v.n_scores):
            first = group[0]
            raise TritonExportError(
                f"{v.name}@{first.version} ({first.platform}, {first.n_scores} scores) and "
                f"@{v.version} ({v.platform}, {v.n_scores} scores) cannot share one Triton "
                f"model; export them separately"
            )
        group.append(v)
    return {name: sorted(group, key=lambda g: g.version) for name, group in groups.items()}


def build_config(
    name: str,
    versions: Sequence[int],
    platform: str,
    n_scores: int,
    max_batch_size: int,
    preferred_batch_sizes: Sequence[int],
    max_queue_delay_us: int,
) -> Any:
    """The `ModelConfig` message of one Triton model (dims exclude the batch axis)."""
    pb = _model_config_pb2()
    kind = next(k for p, _, k in _PLATFORMS.values() if p == platform)
    cfg = pb.ModelConfig(name=name, platform=platform, max_batch_size=max_batch_size)
    cfg.version_policy.specific.versions.extend(versions)
    cfg.input.add(name=INPUT_NAME, data_type=pb.TYPE_INT64, dims=[-1])
    cfg.output.add(name=OUTPUT_NAME, data_type=pb.TYPE_FP32, dims=[n_scores])
    cfg.dynamic_batching.preferred_batch_size.extend(preferred_batch_sizes)
    cfg.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    cfg.instance_group.add(kind=pb.ModelInstanceGroup.Kind.Value(kind), count=1)
    return cfg


def _check_batching(
    max_batch_size: int, preferred_batch_sizes: Sequence[int], max_queue_delay_us: int
) -> None:
    if max_batch_size < 1:
        raise TritonExportError(f"max_batch_size must be >= 1, got {max_batch_size}")
    bad = [b for b in preferred_batch_sizes if not 1 <= b <= max_batch_size]
    if bad:
        raise TritonExportError(
            f"preferred batch size {bad[0]} is outside 1..max_batch_size ({max_batch_size})"
        )
    if max_queue_delay_us < 0:
        raise TritonExportError(f"max_queue_delay_us must be >= 0, got {max_queue_delay_us}")


def _copy_verified(src: Path, dst: Path, sha256: str) -> None:
    shutil.copyfile(src, dst)
    with open(dst, "rb") as f:
        os.fsync(f.fileno())
    if sha256_file(dst) != sha256:  # the source changed between verification and copy
        raise TritonExportError(f"{dst.name} copied from {src} fails its sha256 check; retry")


def export_triton(
    store: ModelStore,
    refs: Sequence[str] | None,
    out_dir: str | Path,
    max_batch_size: int = 64,
    preferred_batch_sizes: Sequence[int] = (8, 16, 32),
    max_queue_delay_us: int = 2000,
    overwrite: bool = False,
) -> list[Path]:
    """Write a Triton model repository to `out_dir`; returns the files written (final paths).

    `refs` None selects the latest version of every stored name with a model.onnx or
    model.plan. Refuses a non-empty `out_dir` unless `overwrite` (which replaces it whole).
    """
    from google.protobuf import text_format

    _model_config_pb2()  # fail early, before any copying, when tritonclient is missing
    preferred = [b for b in preferred_batch_sizes if b <= max_batch_size]
    _check_batching(max_batch_size, preferred, max_queue_delay_us)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise TritonExportError(f"{out} exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise TritonExportError(f"{out} is not empty; choose an empty folder or pass --overwrite")
    groups = _group(_select(store, refs))

    out.parent.mkdir(parents=True, exist_ok=True)
    # A sibling of `out`, so the final rename stays on one file system (and thus atomic).
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    written: list[Path] = []
    try:
        for name, group in groups.items():
            first = group[0]
            cfg = build_config(
                name,
                [v.version for v in group],
                first.platform,
                first.n_scores,
                max_batch_size,
                preferred,
                max_queue_delay_us,
            )
            sources = ", ".join(f"{v.name}@{v.version}" for v in group)
            text = f"# written by recsys export-triton from {sources}\n"
            text += text_format.MessageToString(cfg)
            (tmp / name).mkdir()
            (tmp / name / "config.pbtxt").write_text(text, encoding="utf-8")
            written.append(out / name / "config.pbtxt")
            for v in group:
                (tmp / name / str(v.version)).mkdir()
                _copy_verified(v.folder / v.file, tmp / name / str(v.version) / v.file, v.sha256)
                written.append(out / name / str(v.version) / v.file)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return written


def _replace_dir(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`; an existing `out` (empty, or overwritten) is moved aside first."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex}"
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
