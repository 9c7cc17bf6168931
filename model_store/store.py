"""A versioned, checksummed model store on a local file system (DESIGN.md §3).

Layout: ``<root>/<name>/<version>/manifest.json`` plus the artifact files, and
``<root>/<name>/latest``, a text file holding the latest version number.

Publishing writes into ``<root>/.tmp-<uuid>`` and renames that folder into place, so a crash never
leaves a half-written version; readers ignore the temporary folders.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from model_store.manifest import (
    MANIFEST_FILE,
    NAME_PATTERN,
    SCHEMA_VERSION,
    DatasetInfo,
    Manifest,
    ManifestError,
    ScorerInfo,
    Signature,
    format_validation_error,
    load_manifest,
)

BLOCK_SIZE = 1 << 20  # 1 MiB: large enough for throughput, small enough for memory
LATEST_FILE = "latest"
TMP_PREFIX = ".tmp-"
ITEM_MAPPING = "items.json"
# PyTorch weights (safetensors: tensors + a JSON header, never pickle); the one name every
# reader and writer of a checkpoint uses. Versions holding only the pickle-based `model.pt`
# or `model.pt2` of earlier releases are refused, never loaded.
CHECKPOINT_FILE = "model.safetensors"
LEGACY_CHECKPOINTS = ("model.pt", "model.pt2")
_MAX_PUBLISH_ATTEMPTS = 100
_PLACEHOLDER_SHA = "0" * 64
_FORMAT_BY_SUFFIX = {
    ".pt": "pytorch",
    ".pth": "pytorch",
    ".safetensors": "pytorch",
    ".onnx": "onnx",
    ".plan": "tensorrt",
    ".engine": "tensorrt",
    ".json": "json",
    ".npz": "npz",
    ".npy": "npy",
    ".faiss": "faiss",
}
_NAME_RE = re.compile(NAME_PATTERN)
_REF_HELP = "expected 'name', 'name@latest' or 'name@<version>' (version >= 1)"


class StoreError(Exception):
    """A store operation that cannot proceed; the message names the bad value and the fix."""


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks so model files never sit in memory whole."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK_SIZE):
            digest.update(block)
    return digest.hexdigest()


class ModelStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        # Versions whose artifacts were checked inside `verify_once` (None outside it).
        self._verified: set[tuple[str, int]] | None = None

    @contextmanager
    def verify_once(self) -> Iterator[None]:
        """Within this block `load` checks each version's artifacts once: a published
        version never changes, so a build that reads one parent for several steps pays for
        its sha256 once. Nested blocks share the outer one."""
        if self._verified is not None:
            yield
            return
        self._verified = set()
        try:
            yield
        finally:
            self._verified = None

    # -- publishing --------------------------------------------------------------------------

    def publish(
        self,
        name: str,
        files: Mapping[str, Path],
        *,
        kind: str,
        parent: str | None,
        architecture: Mapping[str, Any],
        recipe: Mapping[str, Any],
        dataset: DatasetInfo | Mapping[str, Any],
        metrics: Mapping[str, float],
        signature: Signature | Mapping[str, Any] | None = None,
        formats: Mapping[str, tuple[str, str]] | None = None,
        tensorrt: Mapping[str, tuple[str, str]] | None = None,
        scorer: ScorerInfo | Mapping[str, Any] | None = None,
    ) -> Manifest:
        """Copy `files` (store file name -> source path) into a new version of `name`.

        `formats[file] = (format, precision)` overrides the format guessed from the suffix and
        the default precision "fp32"; `tensorrt[file] = (tensorrt_version, compute_capability)`
        records where an engine was built; `scorer` makes it a two-stage variant (its files must
        be among `files`; `model_store.two_stage` writes them). Returns the manifest as written.
        """
        _check_name(name)
        if ITEM_MAPPING not in files:
            raise StoreError(
                f"publish {name!r}: files has no {ITEM_MAPPING!r} (the item-id mapping); "
                f"add it, e.g. files[{ITEM_MAPPING!r}] = <path>"
            )
        formats, tensorrt = dict(formats or {}), dict(tensorrt or {})
        for option, given in (("formats", formats), ("tensorrt", tensorrt)):
            unknown = sorted(set(given) - set(files))
            if unknown:
                raise StoreError(
                    f"publish {name!r}: {option} names {unknown[0]!r}, which is not in files "
                    f"({', '.join(sorted(files))})"
                )
        sources = {file_name: Path(src) for file_name, src in files.items()}
        for file_name, src in sources.items():
            if not src.is_file():
                raise StoreError(f"publish {name!r}: source for {file_name!r} is not a file: {src}")

        fields: dict[str, Any] = {
            # The lowest schema that holds it (manifest.SCHEMA_VERSION says why).
            "schema_version": 1 if scorer is None else SCHEMA_VERSION,
            "name": name,
            "kind": kind,
            "parent": parent,
            # Through JSON now so the returned manifest equals the one read back from disk.
            "architecture": _json_roundtrip(architecture, "architecture", name),
            "recipe": _json_roundtrip(recipe, "recipe", name),
            "dataset": dataset,
            "signature": signature,
            "metrics": dict(metrics),
        }
        if scorer is not None:
            fields["scorer"] = scorer

        def artifacts(stats: Mapping[str, tuple[str, int]]) -> dict[str, dict[str, Any]]:
            out = {}
            for file_name, (sha, size) in stats.items():
                fmt, precision = formats.get(file_name, (_guess_format(file_name), "fp32"))
                trt_version, capability = tensorrt.get(file_name, (None, None))
                out[file_name] = {
                    "format": fmt,
                    "precision": precision,
                    "sha256": sha,
                    "size_bytes": size,
                    "tensorrt_version": trt_version,
                    "compute_capability": capability,
                }
            return out

        # Validate all metadata (and the file names, before they become paths) with placeholder
        # checksums, so a bad parent or format fails before gigabytes are copied.
        _build_manifest(fields, 1, artifacts(dict.fromkeys(sources, (_PLACEHOLDER_SHA, 0))))

        self.root.mkdir(parents=True, exist_ok=True)
        # Inside the root so the final rename stays on one file system (and thus atomic).
        tmp = self.root / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            stats = {file: _copy_and_hash(src, tmp / file) for file, src in sources.items()}
            manifest = self._commit(tmp, fields, artifacts(stats))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._update_latest(name)
        return manifest

    def _commit(
        self, tmp: Path, fields: dict[str, Any], artifacts: dict[str, dict[str, Any]]
    ) -> Manifest:
        """Write manifest.json into `tmp` and rename it to the next free version folder."""
        name_dir = self.root / fields["name"]
        name_dir.mkdir(exist_ok=True)
        for _ in range(_MAX_PUBLISH_ATTEMPTS):
            version = max(self.versions(fields["name"]), default=0) + 1
            manifest = _build_manifest(fields, version, artifacts)
            _write_synced(tmp / MANIFEST_FILE, manifest.to_json().encode())
            _fsync_dir(tmp)
            try:
                # Renaming onto an existing (non-empty) version fails rather than replacing it.
                os.rename(tmp, name_dir / str(version))
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    continue  # another publisher took this version: take the next one
                raise
            _fsync_dir(name_dir)
            return manifest
        raise StoreError(
            f"publish {fields['name']!r}: no free version after {_MAX_PUBLISH_ATTEMPTS} attempts "
            f"(too many concurrent publishers?); retry"
        )

    def _update_latest(self, name: str) -> None:
        name_dir = self.root / name
        while True:
            newest = max(self.versions(name))
            tmp = name_dir / f"{TMP_PREFIX}{uuid.uuid4().hex}"
            try:
                _write_synced(tmp, f"{newest}\n".encode())
                os.replace(tmp, name_dir / LATEST_FILE)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            _fsync_dir(name_dir)
            # A concurrent publisher of an older version may have written its number after
            # ours; checking again after each write guarantees the newest number wins.
            if max(self.versions(name)) == newest:
                return

    # -- reading -----------------------------------------------------------------------------

    def resolve(self, ref: str) -> tuple[Manifest, Path]:
        """Manifest and folder for 'name', 'name@latest' or 'name@<version>' (no checksums)."""
        name, wanted = _parse_ref(ref)
        if not self.root.is_dir():
            what = "is not a directory" if self.root.exists() else "does not exist"
            raise StoreError(
                f"model store {self.root} {what}; point --store / RECSYS_STORE at the folder "
                "models were published to"
            )
        versions = self.versions(name)
        if not versions:
            known = ", ".join(self.names()) or "none"
            raise StoreError(
                f"unknown model {name!r} in {self.root} (known models: {known}); publish it first"
            )
        version = self._latest(name, versions) if wanted is None else wanted
        if version not in versions:
            raise StoreError(
                f"model {name!r} has no version {version} "
                f"(known versions: {', '.join(map(str, versions))})"
            )
        folder = self.root / name / str(version)
        try:
            manifest = load_manifest(folder / MANIFEST_FILE)
        except (OSError, ManifestError) as exc:
            raise StoreError(f"cannot read {name}@{version}: {exc}; republish it") from exc
        if (manifest.name, manifest.version) != (name, version):
            raise StoreError(
                f"{folder / MANIFEST_FILE}: says {manifest.name}@{manifest.version} but lies in "
                f"{name}/{version}; move the folder back or republish"
            )
        return manifest, folder

    def load(self, ref: str, verify: bool = True) -> tuple[Manifest, Path]:
        """Like resolve, but (by default) checks every artifact's size and sha256 first."""
        manifest, folder = self.resolve(ref)
        key = (manifest.name, manifest.version)
        if verify and (self._verified is None or key not in self._verified):
            _verify(manifest, folder)
            if self._verified is not None:
                self._verified.add(key)
        return manifest, folder

    def artifact_path(self, ref: str, artifact: str) -> Path:
        """Path of one artifact of a version (not verified: use load() before serving)."""
        manifest, folder = self.resolve(ref)
        if artifact not in manifest.artifacts:
            raise StoreError(
                f"{manifest.name}@{manifest.version} has no artifact {artifact!r} "
                f"(it has: {', '.join(sorted(manifest.artifacts))})"
            )
        return folder / artifact

    def names(self) -> list[str]:
        """Names with at least one published version, sorted."""
        if not self.root.is_dir():
            return []
        # A name folder can be empty when a first publish failed at its final rename.
        return sorted(
            entry.name
            for entry in self.root.iterdir()
            if entry.is_dir() and _is_name(entry.name) and self.versions(entry.name)
        )

    def versions(self, name: str) -> list[int]:
        """Published versions of `name`, ascending; [] for a name never published."""
        _check_name(name)
        name_dir = self.root / name
        if not name_dir.is_dir():
            return []
        # Only canonical positive integers: "latest", temp files and "01" are not versions.
        return sorted(
            int(entry.name)
            for entry in name_dir.iterdir()
            if _is_version(entry.name) and entry.is_dir()
        )

    def _latest(self, name: str, versions: list[int]) -> int:
        path = self.root / name / LATEST_FILE
        try:
            text = path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            # A publisher died between its rename and writing `latest`: the newest version is
            # complete (the rename is atomic), so it is the latest.
            return versions[-1]
        except (OSError, UnicodeDecodeError) as exc:
            raise StoreError(f"{path}: unreadable ({exc}); write a version number into it") from exc
        if not (text.isdigit() and int(text) in versions):
            raise StoreError(
                f"{path}: holds {text[:20]!r}, not a published version "
                f"({', '.join(map(str, versions))}); write one of them into it"
            )
        return int(text)

    def list(self) -> list[Manifest]:
        """Every published manifest, sorted by (name, version)."""
        return [self.resolve(f"{n}@{v}")[0] for n in self.names() for v in self.versions(n)]


def _is_name(name: str) -> bool:
    return isinstance(name, str) and _NAME_RE.fullmatch(name) is not None


def _check_name(name: str) -> None:
    if not _is_name(name):
        raise StoreError(
            f"bad model name {name!r}: use 1-64 characters from a-z 0-9 . _ -, "
            f"starting with a letter or digit"
        )


def _parse_ref(ref: str) -> tuple[str, int | None]:
    """'name' / 'name@latest' -> (name, None); 'name@3' -> (name, 3)."""
    name, at, version = ref.partition("@") if isinstance(ref, str) else ("", "", "")
    if not _is_name(name) or (at and not (version == "latest" or _is_version(version))):
        raise StoreError(f"malformed model reference {ref!r}: {_REF_HELP}")
    return name, (int(version) if at and version != "latest" else None)


def _is_version(text: str) -> bool:
    return text.isascii() and text.isdigit() and text == str(int(text)) and int(text) >= 1


def _guess_format(file_name: str) -> str:
    return _FORMAT_BY_SUFFIX.get(Path(file_name).suffix.lower(), "other")


def _json_roundtrip(value: Mapping[str, Any], what: str, name: str) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(dict(value), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise StoreError(f"publish {name!r}: {what} is not plain JSON ({exc}); convert it") from exc


def _build_manifest(
    fields: dict[str, Any], version: int, artifacts: dict[str, dict[str, Any]]
) -> Manifest:
    created_at = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    data = {**fields, "version": version, "created_at": created_at, "artifacts": artifacts}
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise StoreError(
            f"publish {fields['name']!r}: invalid manifest: {format_validation_error(exc)}"
        ) from exc


def _copy_and_hash(src: Path, dst: Path) -> tuple[str, int]:
    """Copy src to a new file dst, fsynced; hash while copying so each byte is read once."""
    digest = hashlib.sha256()
    size = 0
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        while block := fin.read(BLOCK_SIZE):
            digest.update(block)
            fout.write(block)
            size += len(block)
        fout.flush()
        os.fsync(fout.fileno())
    return digest.hexdigest(), size


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    # Makes renames and new entries in the folder durable across a power loss.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _verify(manifest: Manifest, folder: Path) -> None:
    ref = f"{manifest.name}@{manifest.version}"
    for file_name, info in manifest.artifacts.items():
        path = folder / file_name
        if not path.is_file():
            raise StoreError(f"{ref}: artifact {file_name!r} is missing ({path}); republish {ref}")
        size = path.stat().st_size
        if size != info.size_bytes:
            raise StoreError(
                f"{ref}: artifact {file_name!r} has {size} bytes, manifest says "
                f"{info.size_bytes} (truncated or replaced: {path}); republish {ref}"
            )
        if sha256_file(path) != info.sha256:
            raise StoreError(
                f"{ref}: artifact {file_name!r} fails its sha256 check (corrupted: {path}); "
                f"republish {ref}"
            )
    extra = sorted(
        entry.name
        for entry in folder.iterdir()
        if entry.name != MANIFEST_FILE and entry.name not in manifest.artifacts
    )
    if extra:
        raise StoreError(
            f"{ref}: unexpected file {extra[0]!r} not in the manifest ({folder}); remove it"
        )
