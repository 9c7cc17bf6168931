"""Seeded synthetic interaction data with learnable sequential structure.

Each item has a few fixed "successor" items. A user starts at a popular item; each next
item is, with probability `p_follow`, one of the current item's successors the user has not
seen yet, otherwise a popularity-sampled unseen item. A sequence model can learn the
successor graph; popularity cannot, so a trained model must beat popularity by a wide margin.
This is the embedded default for `recsys demo` and the fast tests.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from compression.data import DataError, SequenceDataset


class SyntheticConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    users: int = Field(2000, ge=3)
    items: int = Field(500, ge=10)
    min_len: int = Field(8, ge=3)
    max_len: int = Field(40, ge=3)
    successors: int = Field(3, ge=1)
    p_follow: float = Field(0.8, ge=0.0, le=1.0)
    zipf: float = Field(1.1, ge=0.0, description="popularity exponent of the noise items")
    seed: int = 0


def parse_synthetic_spec(spec: str) -> SyntheticConfig:
    """`synthetic` or `synthetic:users=500,items=200,seed=1`."""
    _, _, params = spec.partition(":")
    values: dict[str, str] = {}
    for part in filter(None, params.split(",")):
        key, sep, value = part.partition("=")
        if not sep:
            raise DataError(f"synthetic spec {spec!r}: {part!r} is not key=value")
        values[key.strip()] = value.strip()
    try:
        return SyntheticConfig(**values)  # type: ignore[arg-type]
    except ValidationError as exc:
        err = exc.errors()[0]
        raise DataError(
            f"synthetic spec {spec!r}: {'.'.join(map(str, err['loc']))}: {err['msg']}"
        ) from None


def synthetic_dataset(cfg: SyntheticConfig | None = None) -> SequenceDataset:
    cfg = cfg or SyntheticConfig()
    if cfg.min_len > cfg.max_len:
        raise DataError(f"synthetic: min_len={cfg.min_len} exceeds max_len={cfg.max_len}")
    if cfg.max_len > cfg.items:
        raise DataError(f"synthetic: max_len={cfg.max_len} exceeds items={cfg.items}")
    rng = np.random.default_rng(cfg.seed)
    popularity = 1.0 / np.arange(1, cfg.items + 1) ** cfg.zipf
    popularity = popularity[rng.permutation(cfg.items)]
    popularity /= popularity.sum()
    successors = np.stack(
        [rng.choice(cfg.items, size=cfg.successors, replace=False) for _ in range(cfg.items)]
    )
    sequences = []
    for _ in range(cfg.users):
        length = int(rng.integers(cfg.min_len, cfg.max_len + 1))
        seen = np.zeros(cfg.items, dtype=bool)
        item = int(rng.choice(cfg.items, p=popularity))
        seq = [item]
        seen[item] = True
        while len(seq) < length:
            nxt = [s for s in successors[item] if not seen[s]]
            if nxt and rng.random() < cfg.p_follow:
                item = int(nxt[0] if len(nxt) == 1 else rng.choice(nxt))
            else:
                p = np.where(seen, 0.0, popularity)
                item = int(rng.choice(cfg.items, p=p / p.sum()))
            seq.append(item)
            seen[item] = True
        sequences.append(np.array(seq, dtype=np.int64) + 1)  # internal ids start at 1
    digest = hashlib.sha256(json.dumps(cfg.model_dump(), sort_keys=True).encode()).hexdigest()
    return SequenceDataset(
        name="synthetic",
        sequences=sequences,
        n_items=cfg.items,
        item_ids=[f"i{i + 1}" for i in range(cfg.items)],
        user_ids=[f"u{u + 1}" for u in range(cfg.users)],
        sha256=digest,
    )
