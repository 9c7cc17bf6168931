"""The checkpoint format's one rule both sides need: a tensor stored once.

A module may list one tensor under several names (`shared_blocks`: one block listed for every
layer). `model.safetensors` stores it once, under its first name. The writer (compression)
and both readers (compression's `load_checkpoint`, the service's torch engine) use this one
mapping. Duck-typed on the tensors, so this package never imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def stored_names(state: Mapping[str, Any]) -> dict[str, str]:
    """Each name of a module's `state_dict()` -> the name its tensor is stored under (the
    first name that lists the same storage, offset, shape and dtype)."""
    first: dict[tuple[Any, ...], str] = {}
    return {
        name: first.setdefault(
            (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype), name
        )
        for name, t in state.items()
    }
