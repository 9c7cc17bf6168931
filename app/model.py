"""A stored model version ready to serve: engine, item-id mapping, popularity fallback, top-k.

Reads only the store's files (manifest, `items.json`, the artifact); never `compression/`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.engines import Engine, TorchModuleFactory, build_engine
from app.scorers import Ranking, build_ranking
from model_store import ModelStore
from model_store.item_ids import ItemIdError, check_item_ids, is_canonical_decimal

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A stored version that cannot be served (names the version and the problem)."""


@dataclass(slots=True)
class Query:
    """One request after id mapping: what the batcher carries to the engine thread."""

    inputs: np.ndarray  # internal ids, the most recent `max_len`, oldest first
    exclude: np.ndarray | None  # internal ids never to recommend (the whole known history)
    k: int


@dataclass(slots=True)
class Ranked:
    items: list[str]  # original item ids, spelled as in the catalogue, best first
    scores: list[float]


# Catalogues of canonical decimal ids ("0", "7", "3952"; not "007") whose largest id is below
# this also get a dense table for integer requests (8 bytes per id, at most 16 MB).
DENSE_IDS = 1 << 21


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    for bucket in buckets:
        if length <= bucket:
            return bucket
    return buckets[-1]


# Fewer rows than this in a bucket ride along with the next longer bucket: an extra engine
# call costs ~0.1 ms of fixed overhead, more than the padding it would save.
MIN_GROUP_ROWS = 4


def bucket_groups(lengths: Sequence[int], buckets: Sequence[int]) -> list[tuple[int, list[int]]]:
    """Rows of a batch grouped by the smallest bucket that fits each, shortest bucket first.

    Padding a whole batch to its longest history made every row pay for it: on ML-1M
    (median history ~100 items, mean 165) most batches of 32 held one 200-item history.
    """
    by_bucket: dict[int, list[int]] = {}
    for row, n in enumerate(lengths):
        by_bucket.setdefault(bucket_for(n, buckets), []).append(row)
    groups, carry = [], []
    longest = max(by_bucket)
    for bucket in sorted(by_bucket):
        rows = carry + by_bucket[bucket]
        if len(rows) < MIN_GROUP_ROWS and bucket != longest:
            carry = rows
            continue
        groups.append((bucket, rows))
        carry = []
    return groups


class LoadedModel:
    """One `name@version` from the store, verified, with its engine built and warmed up."""

    def __init__(
        self,
        store: ModelStore,
        ref: str,
        engine_kind: str,
        threads: int,
        buckets: Sequence[int],
        torch_factory: TorchModuleFactory | None = None,
    ) -> None:
        try:
            manifest, folder = store.load(ref, verify=True)
            self.manifest = manifest
            self.ref = f"{manifest.name}@{manifest.version}"
            self.max_len = int(manifest.architecture["max_len"])
            self.n_items = int(manifest.dataset.n_items)
            artifacts = {k: v.model_dump() for k, v in manifest.artifacts.items()}
            # Full-score models rank the engine's scores; two-stage ones its user vectors
            # (`app.scorers`, chosen by the manifest's `scorer`).
            ranking = build_ranking(manifest, folder, threads)
            self.engine: Engine = build_engine(
                folder, artifacts, engine_kind, threads, self.max_len,
                architecture=manifest.architecture, torch_factory=torch_factory,
                output=ranking.output,
            )  # fmt: skip
            self._load_items(folder / manifest.item_mapping)
        except ModelLoadError:
            raise
        except Exception as exc:  # store, manifest, engine, scorer and mapping errors alike
            raise ModelLoadError(f"{ref}: cannot be served: {exc}") from exc
        self.ranker: Ranking = ranking.ranking
        self.output_width = ranking.width
        self.scorer = "full" if manifest.scorer is None else manifest.scorer.kind
        # A full-score model's lone request may run on the event loop (`inline_when_idle`);
        # a catalogue scan takes milliseconds the loop must not lose.
        self.runs_inline = manifest.scorer is None
        self.buckets = sorted({min(b, self.max_len) for b in buckets} | {self.max_len})
        precisions = {a.precision for a in manifest.artifacts.values() if a.format == "onnx"}
        if manifest.scorer is not None:
            precisions.add(f"items-{manifest.scorer.precision}")
        self.precision = ",".join(sorted(precisions)) or "fp32"
        self.size_bytes = sum(
            a.size_bytes for a in manifest.artifacts.values() if a.format in ("onnx", "tensorrt")
        )
        # What this variant holds or maps: model file(s), item matrix, index, scorer tables.
        # int4 files are folded to float32 weights when loaded (model_store.runtime).
        held = self.size_bytes
        if "int4" in precisions:
            held = max(held, int(4 * manifest.metrics.get("params", 0.0)))
        self.memory_bytes = {"model_bytes": held, **ranking.memory_bytes}

    def _load_items(self, path: Path) -> None:
        payload: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        ids = payload["item_ids"]
        if payload.get("format") != "recsys-item-mapping/1" or len(ids) != self.n_items:
            raise ModelLoadError(f"{path}: not an item mapping for {self.n_items} items")
        try:  # strings as spelled; a hand-written JSON integer reads as its decimal string
            self.item_ids: list[str] = check_item_ids(
                ids, str(path), "publish the model again from data where each item has one id"
            )
        except ItemIdError as exc:
            raise ModelLoadError(str(exc)) from None
        # Responses: one fancy index + `.tolist()` per batch yields the catalogue's strings.
        self._originals = np.array(self.item_ids, dtype=object)
        # Original id -> internal id: every id as its string, and a canonical decimal id
        # ("7", not "007") also as the int a request may send for it (JSON 7 means "7").
        self.to_internal: dict[int | str, int] = {o: i + 1 for i, o in enumerate(self.item_ids)}
        numbers = {int(o): i + 1 for i, o in enumerate(self.item_ids) if is_canonical_decimal(o)}
        self.to_internal.update(numbers)
        # Fast path for integer requests: every id a canonical decimal below DENSE_IDS gives a
        # dense table, int id -> internal id (0 = unknown), mapped with no per-item lookup.
        self._dense: np.ndarray | None = None
        if len(numbers) == self.n_items and self.n_items and max(numbers) < DENSE_IDS:
            self._dense = np.zeros(max(numbers) + 1, dtype=np.int64)
            self._dense[np.fromiter(numbers, np.int64, len(numbers))] = list(numbers.values())
        counts = payload.get("counts")
        if counts is None or len(counts) != self.n_items:
            log.warning("%s: no popularity counts; fallback ranks items by id", path)
            counts = [0] * self.n_items
        # Stable: equally popular items keep id order, so the fallback is deterministic.
        self.popular = np.argsort(-np.asarray(counts, dtype=np.int64), kind="stable") + 1
        self.popular_scores = np.asarray(counts, dtype=np.float32)

    def map_history(self, history: Sequence[int | str]) -> tuple[np.ndarray, int]:
        """Internal ids of the known items (oldest first) and how many were unknown.

        A string matches the catalogue id spelled exactly so; an int matches its decimal
        string (7 -> "7", never "007")."""
        # This runs on the event loop for every request. With a dense table (numeric ids
        # below DENSE_IDS): 8 µs for a 172-item ML-1M history, vs 17 µs for a dict lookup per
        # item and 18 µs for a binary search over the sorted catalogue (measured side by side).
        # String histories take the dict: parsing them with numpy's string functions cost 3x
        # a lookup per item.
        table = self._dense
        if table is not None and history and type(history[0]) is int:
            ids = np.asarray(history)  # all ints: int64 (the schema bounds them to [0, 2**63))
            if ids.dtype.kind == "i":  # otherwise a string is mixed in: the dict below
                if ids.max() >= len(table):
                    ids = ids[ids < len(table)]
                internal = table[ids]
                known_ids = internal[internal > 0]
                return known_ids, len(history) - len(known_ids)
        lookup = self.to_internal.get
        known = [i for i in map(lookup, history) if i is not None]
        return np.asarray(known, dtype=np.int64), len(history) - len(known)

    def warm_up(self, max_batch_size: int) -> float:
        """Run every (batch, length bucket) shape the batcher can send; returns seconds.

        The ranking step sees one shape per batch size (not per bucket), so it runs once per
        size: for a 5M-item scan that is a few scans, not one per bucket."""
        started = time.perf_counter()
        sizes = sorted({1, max_batch_size} | {b for b in (8, 32) if b < max_batch_size})
        what = "scores" if self.scorer == "full" else "user vectors"
        for size in sizes:
            for length in self.buckets:
                ids = np.ones((size, length), dtype=np.int64)
                outputs = self.engine.run(ids)
                if outputs.shape != (size, self.output_width):
                    raise ModelLoadError(
                        f"{self.ref}: engine returned {what} {outputs.shape}, expected "
                        f"({size}, {self.output_width}); the artifact does not match its manifest"
                    )
                if not np.isfinite(outputs).all():
                    raise ModelLoadError(f"{self.ref}: engine returns non-finite {what}")
            self.ranker.top_k(outputs, [None] * size, min(10, self.n_items))
        return time.perf_counter() - started

    def run_batch(self, queries: Sequence[Query]) -> list[Ranked]:
        """Split the batch by length bucket (`bucket_groups`), score each part padded to its
        bucket, then mask and top-k in one ONNX Runtime call (`app.ranking`). This runs in a
        worker thread, and every Python-level step holds the GIL the event loop needs."""
        groups = bucket_groups([len(q.inputs) for q in queries], self.buckets)
        if len(groups) == 1:
            return self._rank(queries, groups[0][0])
        out: list[Ranked] = [None] * len(queries)  # type: ignore[list-item]
        for length, rows in groups:
            part = self._rank([queries[r] for r in rows], length)
            for row, ranked in zip(rows, part, strict=True):
                out[row] = ranked
        return out

    def _rank(self, queries: Sequence[Query], length: int) -> list[Ranked]:
        ids = np.zeros((len(queries), length), dtype=np.int64)
        for row, q in enumerate(queries):
            if len(q.inputs):
                ids[row, length - len(q.inputs) :] = q.inputs
        scores = self.engine.run(ids)
        k_max = min(max(q.k for q in queries), self.n_items)
        top_scores, top_ids = self.ranker.top_k(scores, [q.exclude for q in queries], k_max)
        # One conversion per batch: per-row numpy calls hold the GIL the event loop needs.
        items = self._originals[top_ids - 1].tolist()
        values = top_scores.tolist()
        out = []
        for q, row_items, row_values in zip(queries, items, values, strict=True):
            row_items, row_values = row_items[: q.k], row_values[: q.k]
            if row_values and row_values[-1] == -math.inf:  # fewer than k left after masking
                keep = [j for j, v in enumerate(row_values) if v != -math.inf]
                row_items = [row_items[j] for j in keep]
                row_values = [row_values[j] for j in keep]
            out.append(Ranked(row_items, row_values))
        return out

    def popular_top_k(self, k: int, exclude: np.ndarray | None) -> Ranked:
        """The fallback for histories with no known item: most popular items first."""
        items = self.popular
        if exclude is not None and len(exclude):
            items = items[~np.isin(items, exclude)]
        items = items[:k]
        scores = self.popular_scores[items - 1].tolist()
        return Ranked([self.item_ids[i - 1] for i in items], scores)

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "model": m.name,
            "version": m.version,
            "kind": m.kind,
            "parent": m.parent,
            "created_at": m.created_at,
            "engine": self.engine.name,
            "precision": self.precision,
            "max_len": self.max_len,
            "n_items": self.n_items,
            "size_bytes": self.size_bytes,
            "scorer": self.scorer,
            "ranking": self.ranker.name,
            "memory_bytes": sum(self.memory_bytes.values()),
            "memory": self.memory_bytes,
            "metrics": m.metrics,
        }
