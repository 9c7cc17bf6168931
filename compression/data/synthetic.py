"""Seeded synthetic interaction data with learnable sequential structure.

Each item has a few fixed "successor" items. A user starts at a popular item; each next
item is, with probability `p_follow`, one of the current item's successors the user has not
seen yet, otherwise a popularity-sampled unseen item. A sequence model can learn the
successor graph; popularity cannot, so a trained model must beat popularity by a wide margin.

With `clusters` > 0 the catalogue is split into that many "tastes" (each with its own
power-law popularity): an item's successors lie in its own cluster, and a non-successor step
stays in the current item's cluster with probability `p_stay` (else it is drawn from the
whole catalogue by popularity). The next item then depends mostly on the last one or two,
which a short-context student can learn as well as a long-context teacher; `recsys demo`
uses this form. `clusters = 0` (the default) is the plain successor graph the fast tests use.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from compression.data.sequences import DataError, SequenceDataset


class SyntheticConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    users: int = Field(2000, ge=3)
    items: int = Field(500, ge=10)
    min_len: int = Field(8, ge=3)
    max_len: int = Field(40, ge=3)
    successors: int = Field(3, ge=1)
    p_follow: float = Field(0.8, ge=0.0, le=1.0)
    zipf: float = Field(1.1, ge=0.0, description="popularity exponent of the noise items")
    clusters: int = Field(0, ge=0, description="tastes; 0 = one catalogue-wide graph")
    p_stay: float = Field(0.8, ge=0.0, le=1.0, description="non-successor step in the cluster")
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
    if cfg.clusters:
        return _clustered(cfg)
    rng = np.random.default_rng(cfg.seed)
    popularity = 1.0 / np.arange(1, cfg.items + 1) ** cfg.zipf
    popularity = popularity[rng.permutation(cfg.items)]
    popularity /= popularity.sum()
    successors = np.stack(
        [rng.choice(cfg.items, size=cfg.successors, replace=False) for _ in range(cfg.items)]
    )

    def other(item: int, seen: np.ndarray) -> int:  # any unseen item, by popularity
        p = np.where(seen, 0.0, popularity)
        return int(rng.choice(cfg.items, p=p / p.sum()))

    return _dataset(cfg, _walks(cfg, rng, popularity, successors, other))


def _walks(
    cfg: SyntheticConfig,
    rng: np.random.Generator,
    popularity: np.ndarray,
    successors: np.ndarray,
    other: Callable[[int, np.ndarray], int],
) -> list[np.ndarray]:
    """One history per user: a popular first item, then mostly an unseen successor of the
    last item (`p_follow`), else `other(item, seen)`; no item twice."""
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
                item = other(item, seen)
            seq.append(item)
            seen[item] = True
        sequences.append(np.array(seq, dtype=np.int64) + 1)  # internal ids start at 1
    return sequences


def _clustered(cfg: SyntheticConfig) -> SequenceDataset:
    """The `clusters` > 0 form (module docstring)."""
    size = cfg.items // cfg.clusters
    if size <= cfg.successors:
        raise DataError(
            f"synthetic: {cfg.clusters} clusters of {cfg.items} items leave {size} per cluster, "
            f"not more than successors={cfg.successors}"
        )
    rng = np.random.default_rng(cfg.seed)
    cluster = rng.permutation(np.arange(cfg.items) % cfg.clusters)  # item -> its cluster
    members = [np.flatnonzero(cluster == c) for c in range(cfg.clusters)]
    popularity = np.empty(cfg.items)
    for m in members:  # a power law inside every cluster
        popularity[m] = 1.0 / rng.permutation(np.arange(1, len(m) + 1)) ** cfg.zipf
    popularity /= popularity.sum()
    successors = np.stack(
        [
            rng.choice(members[cluster[i]][members[cluster[i]] != i], cfg.successors, False)
            for i in range(cfg.items)
        ]
    )

    def other(item: int, seen: np.ndarray) -> int:  # mostly an unseen item of its cluster
        pool = members[cluster[item]]
        p = np.where(seen[pool], 0.0, popularity[pool])
        if p.sum() == 0.0 or rng.random() >= cfg.p_stay:
            pool = np.arange(cfg.items)
            p = np.where(seen, 0.0, popularity)
        return int(pool[rng.choice(len(pool), p=p / p.sum())])

    return _dataset(cfg, _walks(cfg, rng, popularity, successors, other))


def _dataset(cfg: SyntheticConfig, sequences: list[np.ndarray]) -> SequenceDataset:
    # Without clusters, the digest of the settings that existed before them (stored models
    # trained on that data keep matching it).
    fields = cfg.model_dump(exclude=None if cfg.clusters else {"clusters", "p_stay"})
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    return SequenceDataset(
        name="synthetic",
        sequences=sequences,
        n_items=cfg.items,
        item_ids=[f"i{i + 1}" for i in range(cfg.items)],
        user_ids=[f"u{u + 1}" for u in range(cfg.users)],
        sha256=digest,
    )
