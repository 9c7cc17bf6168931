"""Interaction data: one chronological item sequence per user, internal ids 1..n_items.

Internal item id 0 is padding everywhere (models, ONNX inputs, score columns). The mapping
from internal ids back to the user's original ids travels with every model, because the
service must answer in the user's own ids.

Loaders for raw event logs live in `compression.data.events`, the synthetic generator in
`compression.data.synthetic`; `compression.data.load.load_dataset` dispatches on the format.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model_store.item_ids import ItemIdError, check_item_ids
from model_store.store import sha256_file

# How to fix a catalogue whose ids collide (model_store.item_ids): said by every refusal here.
COLLISION_FIX = (
    "give each item one spelling in the data (rename one id or merge their events) and train again"
)


class DataError(ValueError):
    """A data file that cannot be used; the message names file, line and problem."""


@dataclass(frozen=True)
class SequenceDataset:
    """Users' chronological sequences of internal item ids (1..n_items)."""

    name: str
    sequences: list[np.ndarray]
    n_items: int
    item_ids: list[str]  # original id of internal item i is item_ids[i - 1]
    user_ids: list[str]
    sha256: str  # hash of the source (file bytes or generator parameters)

    def __post_init__(self) -> None:
        if len(self.item_ids) != self.n_items:
            raise DataError(
                f"{self.name}: {len(self.item_ids)} original item ids for {self.n_items} items"
            )
        if len(self.user_ids) != len(self.sequences):
            raise DataError(
                f"{self.name}: {len(self.user_ids)} user ids for {len(self.sequences)} sequences"
            )

    @property
    def n_users(self) -> int:
        return len(self.sequences)

    @property
    def n_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    def summary(self) -> dict[str, float | int | str]:
        lengths = np.array([len(s) for s in self.sequences])
        return {
            "name": self.name,
            "users": self.n_users,
            "items": self.n_items,
            "interactions": self.n_interactions,
            "mean_length": round(float(lengths.mean()), 2) if len(lengths) else 0.0,
            "sha256": self.sha256,
        }

    def save_item_mapping(self, path: Path, counts: np.ndarray | None = None) -> None:
        """Write `{"format": ..., "item_ids": [...]}`: position i holds internal id i + 1.

        `counts` (indexed by internal id, index 0 ignored) are the training interactions per
        item: the service answers histories it knows nothing about with the most popular.
        """
        write_item_mapping(path, self.item_ids, None if counts is None else counts[1:])


def write_item_mapping(
    path: Path, item_ids: Sequence[str], counts: Sequence[int] | np.ndarray | None = None
) -> None:
    """Ids are written as strings, exactly as spelled; a catalogue with a bad id or two ids
    that collide (`model_store.item_ids`) raises `DataError` and writes nothing."""
    try:
        ids = check_item_ids(item_ids, "item mapping", COLLISION_FIX)
    except ItemIdError as exc:
        raise DataError(str(exc)) from None
    payload: dict[str, object] = {
        "format": "recsys-item-mapping/1",
        "doc": "item_ids[i] is the original id of internal item id i + 1; internal id 0 is padding",
        "n_items": len(ids),
        "item_ids": ids,
    }
    if counts is not None:
        if len(counts) != len(item_ids):
            raise ValueError(f"{len(counts)} counts for {len(item_ids)} items")
        payload["counts"] = [int(c) for c in counts]
    path.write_text(json.dumps(payload))


def read_item_mapping(path: Path) -> list[str]:
    try:
        payload = json.loads(path.read_text())
        ids = payload["item_ids"]
        if payload.get("format") != "recsys-item-mapping/1" or len(ids) != payload["n_items"]:
            raise ValueError("wrong format tag or count")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a valid item mapping ({exc})") from exc
    try:
        return check_item_ids(ids, str(path), "fix the mapping or publish the model again")
    except ItemIdError as exc:
        raise DataError(str(exc)) from None


def remap_items(
    name: str,
    users: list[str],
    raw_sequences: list[list[str]],
    sha256: str,
    numeric: bool,
    where: str | None = None,
) -> SequenceDataset:
    """Map original item ids to 1..n in sorted order (numeric ids sort as numbers).

    Ids stay the strings they are. Two that collide (`model_store.item_ids`: "007" and "7")
    raise `DataError` here (naming `where`, by default `name`), before any training, as they
    would when the model is published.
    """
    vocab = {item for seq in raw_sequences for item in seq}
    # (int, str): a fixed order even for ids with one numeric value ("007" and "7").
    ordered = sorted(vocab, key=lambda i: (int(i), i)) if numeric else sorted(vocab)
    try:
        check_item_ids(ordered, where or name, COLLISION_FIX)
    except ItemIdError as exc:
        raise DataError(str(exc)) from None
    index = {item: i + 1 for i, item in enumerate(ordered)}
    sequences = [
        np.fromiter((index[i] for i in seq), dtype=np.int64, count=len(seq))
        for seq in raw_sequences
    ]
    return SequenceDataset(name, sequences, len(ordered), ordered, users, sha256)


def load_sequence_file(path: Path, name: str | None = None) -> SequenceDataset:
    """Read `user item item ...` lines (S3-Rec / SASRec format), items oldest first."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass the path of a sequence file")
    users: list[str] = []
    raw: list[list[str]] = []
    seen: set[str] = set()
    with path.open("r", encoding="utf-8", errors="strict") as fh:
        try:
            for lineno, line in enumerate(fh, start=1):
                fields = line.split()
                if not fields:
                    continue
                if len(fields) < 2:
                    raise DataError(
                        f"{path}:{lineno}: user {fields[0]!r} has no items; "
                        "expected 'user item item ...'"
                    )
                bad = next((f for f in fields if not (f.isascii() and f.isdigit())), None)
                if bad is not None:
                    raise DataError(
                        f"{path}:{lineno}: {bad!r} is not a non-negative integer id; "
                        "expected 'user item item ...'"
                    )
                if fields[0] in seen:
                    raise DataError(
                        f"{path}:{lineno}: user {fields[0]} appears twice; "
                        "each user must be on one line"
                    )
                seen.add(fields[0])
                users.append(fields[0])
                raw.append(fields[1:])  # as spelled: "007" stays "007"
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if not raw:
        raise DataError(f"{path}: no sequences found; the file is empty")
    return remap_items(
        name or path.stem, users, raw, sha256_file(path), numeric=True, where=str(path)
    )


@dataclass(frozen=True)
class Split:
    """Leave-one-out: last item is test, second-last validation, the rest trains.

    `train[u]` is what the model learns from. Validation ranks `valid_target[u]` given
    `train[u]`; test ranks `test_target[u]` given `train[u] + valid_target[u]`.
    Users with fewer than 3 items only train (target 0 = no evaluation), as in SASRec.
    """

    train: list[np.ndarray]
    valid_target: np.ndarray
    test_target: np.ndarray
    n_items: int

    def eval_inputs(self, stage: str) -> tuple[list[np.ndarray], np.ndarray]:
        """Histories and targets of the users evaluated at `stage` ('valid' or 'test')."""
        if stage == "valid":
            users = np.flatnonzero(self.valid_target > 0)
            return [self.train[u] for u in users], self.valid_target[users]
        if stage == "test":
            users = np.flatnonzero(self.test_target > 0)
            hist = [np.append(self.train[u], self.valid_target[u]) for u in users]
            return hist, self.test_target[users]
        raise ValueError(f"stage must be 'valid' or 'test', got {stage!r}")

    def item_counts(self) -> np.ndarray:
        """Training interactions per internal item id (index 0 = padding, always 0)."""
        counts = np.zeros(self.n_items + 1, dtype=np.int64)
        if self.train:
            np.add.at(counts, np.concatenate(self.train), 1)
        counts[0] = 0
        return counts


def leave_one_out(data: SequenceDataset) -> Split:
    train, valid, test = [], [], []
    for seq in data.sequences:
        if len(seq) < 3:
            train.append(seq)
            valid.append(0)
            test.append(0)
        else:
            train.append(seq[:-2])
            valid.append(int(seq[-2]))
            test.append(int(seq[-1]))
    return Split(
        train, np.array(valid, dtype=np.int64), np.array(test, dtype=np.int64), data.n_items
    )


def pad_left(
    histories: Sequence[np.ndarray], max_len: int, length: int | None = None
) -> np.ndarray:
    """Keep each history's most recent `max_len` items, left-pad with 0 to a common length.

    `length` fixes the padded width (e.g. a serving bucket); by default it is the longest
    kept history, so a batch of short histories stays narrow.
    """
    kept = [h[-max_len:] for h in histories]
    width = length if length is not None else max((len(h) for h in kept), default=1)
    out = np.zeros((len(kept), max(width, 1)), dtype=np.int64)
    for row, h in enumerate(kept):
        if len(h):
            out[row, width - len(h) :] = h[-width:]
    return out
