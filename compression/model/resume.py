"""Resumable training: `train` writes its whole state after every epoch, and the same
command run again continues from the last finished epoch instead of starting over.

Why: a headline student takes two to three hours on two cores, and a session, a machine or
an OOM can end before it does (three 68-epoch students were lost that way). The state
holds everything an epoch depends on (weights, moving average, optimizers, the best
weights so far, the plateau counters, the history, every random generator, the loss's own
schedule), so a resumed run ends with the same weights as an uninterrupted one (tested).

The file is named by a fingerprint of what the run trains (configs, data, loss), so a
changed recipe starts fresh instead of continuing another run. It is a safetensors file (the
tensors) whose header holds the rest as JSON, with each tensor's place marked: nothing is
unpickled, not even with `weights_only` (the project's rule, tests/reliability). It is written
atomically.
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

STATE_FORMAT = "recsys-train-state/2"  # /1 was torch.save, never read
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
    return dict(rng.bit_generator.state)


def set_numpy_state(rng: np.random.Generator, state: dict[str, Any]) -> None:
    rng.bit_generator.state = state


def _split(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """`value` as JSON, each tensor moved into `tensors` and replaced by its key; dicts keep
    their key types and tuples stay tuples (optimizers read both)."""
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu().clone().contiguous()  # clone: no shared storage
        return {"tensor": key}
    if isinstance(value, dict):
        return {"dict": [[_split(k, tensors), _split(v, tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"tuple": [_split(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_split(v, tensors) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot keep a {type(value).__name__} in a training state")


def _join(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    if isinstance(value, dict):
        if "tensor" in value:
            return tensors[value["tensor"]]
        if "tuple" in value:
            return tuple(_join(v, tensors) for v in value["tuple"])
        return {_join(k, tensors): _join(v, tensors) for k, v in value["dict"]}
    return value


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write atomically: a run killed (or a machine that died) while saving keeps the
    previous epoch's state. The temporary file is unique, so two runs never share one."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    header = json.dumps(_split({"format": STATE_FORMAT, **state}, tensors))
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(save(tensors, metadata={"state": header}))
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def load_state(path: Path, log: Callable[[str], None]) -> dict[str, Any] | None:
    """The state in `path`, or None (no file, or one that cannot be read: said in `log`,
    and the run starts from scratch rather than failing)."""
    from safetensors import safe_open

    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as file:
            header = (file.metadata() or {})["state"]
            tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118
        state = _join(json.loads(header), tensors)
    except Exception as exc:  # a truncated or foreign file: start over, say why
        why = " ".join(str(exc).split())[:200]
        log(f"ignoring unreadable training state {path}: {why}")
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
