"""A teacher's targets for every training position, computed once and cached on disk
(memory-mapped), so every student of the same teacher and data reuses them, and a resumed
run does not recompute them (they took 520 s of the ML-1M teacher per 3/16 student).

The cache key covers the teacher (a file checksum), the training pairs, and the settings
(`width`, `top_k`, temperature, context): change any and the targets are computed again.
Arrays are written with `np.save` into a temporary folder renamed into place (a crash never
leaves half a cache) and read with `allow_pickle=False`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from compression.distill.loss import TargetsFn, TeacherTargets, teacher_targets
from compression.model.sasrec import SASRec

FIELDS = ("offsets", "top_ids", "top_logits", "lse", "rank")
# Part of every key: raise it when what the targets hold or how they are computed changes,
# so no cache written by older code is read as current.
TARGETS_VERSION = 1


def targets_key(
    teacher: bytes,
    inputs: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    settings: dict[str, int | float],
) -> str:
    """A folder name for the targets of `teacher` (bytes naming it: a checksum, its id
    join) on these pairs with these settings."""
    digest = hashlib.sha256(teacher)
    for x, y in zip(inputs, targets, strict=True):
        digest.update(np.asarray(x, np.int64).tobytes() + b"|" + np.asarray(y, np.int64).tobytes())
    digest.update(json.dumps({**settings, "version": TARGETS_VERSION}, sort_keys=True).encode())
    return digest.hexdigest()[:32]


def cached_targets(
    folder: Path, temperature: float, compute: Callable[[], TeacherTargets]
) -> TeacherTargets:
    """The targets cached in `folder`, computed by `compute()` and written there first if
    they are not."""
    if not all((folder / f"{name}.npy").is_file() for name in FIELDS):
        _write(folder, compute())
    arrays = {
        name: np.load(folder / f"{name}.npy", mmap_mode="c", allow_pickle=False) for name in FIELDS
    }
    return TeacherTargets(
        np.asarray(arrays["offsets"]),
        torch.from_numpy(arrays["top_ids"]),
        torch.from_numpy(arrays["top_logits"]),
        torch.from_numpy(arrays["lse"]),
        torch.from_numpy(arrays["rank"]),
        temperature,
    )


def _write(folder: Path, targets: TeacherTargets) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    for name in FIELDS:
        value = getattr(targets, name)
        array = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        np.save(tmp / f"{name}.npy", array, allow_pickle=False)
    try:
        tmp.rename(folder)  # whole or absent
    except OSError:  # another run finished the same targets first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
        if not folder.is_dir():
            raise


def stored_teacher_targets(teacher: SASRec, teacher_sha256: str, cache_dir: Path) -> TargetsFn:
    """`DistillLoss`'s `targets_of` for a stored teacher (`teacher_sha256`: its checkpoint's
    checksum): `teacher_targets`, cached."""

    def targets_of(
        inputs: Sequence[np.ndarray],
        targets: Sequence[np.ndarray],
        width: int,
        top_k: int,
        temperature: float,
    ) -> TeacherTargets:
        top_k = min(top_k, teacher.cfg.n_items)
        settings: dict[str, int | float] = {"width": width, "top_k": top_k, "T": temperature}
        who = b"stored " + teacher_sha256.encode()
        folder = cache_dir / targets_key(who, inputs, targets, settings)
        return cached_targets(
            folder,
            temperature,
            lambda: teacher_targets(teacher, inputs, targets, width, top_k, temperature),
        )

    return targets_of
