"""Resumable training: `train` writes its whole state after every epoch, and the same
command run again continues from the last finished epoch instead of starting over.

Why: a headline student takes two to three hours on two cores, and a session, a machine or
an OOM can end before it does (three 68-epoch students were lost that way). The state
holds everything an epoch depends on (weights, moving average, optimizers, the best
weights so far, the plateau counters, the history, every random generator, the loss's own
schedule), so a resumed run ends with the same weights as an uninterrupted one (tested).

The file is named by a fingerprint of what the run trains (configs, data, loss), so a
changed recipe starts fresh instead of continuing another run; it is written atomically and
read with `torch.load(weights_only=True)`: only tensors and plain values, never objects.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compression.configs import ModelConfig, TrainConfig

STATE_FORMAT = "recsys-train-state/1"
# Settings that change how fast a run goes, not what it computes.
NOT_FINGERPRINTED = {"threads", "time_limit_s", "device"}


@dataclass(frozen=True)
class ResumeAt:
    """Where `train` keeps the state of run `name`; `key` names what else the run depends
    on beyond its configs and data (the teacher and the distillation settings)."""

    folder: Path
    name: str
    key: str = ""


def fingerprint(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    n_pairs: int,
    key: str,
    init: torch.nn.Module | None = None,
) -> str:
    """What a state file must match to be resumed: both configs (less the speed settings),
    the number of training pairs, the caller's `key` (teacher and distillation) and the
    weights the run started from (`init`: a pruned model to fine-tune)."""
    digest = hashlib.sha256()
    what = {
        "model": model_cfg.model_dump(),
        "train": train_cfg.model_dump(exclude=NOT_FINGERPRINTED),
        "pairs": n_pairs,
        "key": key,
        "format": STATE_FORMAT,
    }
    digest.update(json.dumps(what, sort_keys=True).encode())
    for name, tensor in (init.state_dict() if init is not None else {}).items():
        plain = (
            tensor.detach().cpu().to(torch.float32 if tensor.is_floating_point() else torch.int64)
        )
        digest.update(name.encode() + plain.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def state_path(folder: Path, name: str, print_: str) -> Path:
    """`<folder>/<name>-<fingerprint>.pt`."""
    return folder / f"{name}-{print_}.pt"


def numpy_state(rng: np.random.Generator) -> dict[str, Any]:
    # 128-bit integers as strings: the safe loader takes only plain values.
    return json.loads(json.dumps(rng.bit_generator.state, default=str), parse_int=str)


def set_numpy_state(rng: np.random.Generator, state: dict[str, Any]) -> None:
    def ints(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: ints(v) for k, v in value.items()}
        return int(value) if isinstance(value, str) and value.lstrip("-").isdigit() else value

    rng.bit_generator.state = ints(state)


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: a run killed (or a machine that died) while saving keeps the
    previous epoch's state. The temporary file is unique, so two runs never share one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save({"format": STATE_FORMAT, **state}, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def load_state(path: Path, log: Callable[[str], None]) -> dict[str, Any] | None:
    """The state in `path`, or None (no file, or one that cannot be read: said in `log`,
    and the run starts from scratch rather than failing)."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: start over, say why
        log(f"ignoring unreadable training state {path}: {exc}")
        return None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        log(f"ignoring training state {path}: not a {STATE_FORMAT} file")
        return None
    return state


def remove_states(folder: Path, name: str) -> None:
    """Drop every state of runs named `name` (the finished one and stale fingerprints), and
    only those: `a-b-<fingerprint>.pt` belongs to run `a-b`, not to run `a`."""
    if not folder.is_dir():
        return
    mine = re.compile(re.escape(name) + r"-[0-9a-f]{16}\.pt")
    for path in folder.iterdir():
        if mine.fullmatch(path.name):
            path.unlink(missing_ok=True)
