"""Approximate top-k through a FAISS index, with exact history exclusion and exact scores.

The index is asked for k + (the row's excluded items) neighbours, so that k remain even if
the whole history is among them; excluded items are dropped; the rest are rescored with the
stored item matrix (so an item scores the same as under the exact scorer). A row still short
of k items (the index found too few) is asked again with twice as many, and after
`MAX_TRIES` it is scored by the exact scorer: exclusion never depends on the index's recall.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from app.candidates import Exclusions, select_top_k
from app.exact_scorer import ExactScorer
from model_store.manifest import HnswParams, IvfParams

MAX_TRIES = 3


class AnnScorer:
    """`top_k(user_vectors, exclude, k)` like `ExactScorer`, searched in `index`."""

    def __init__(
        self, index: Any, params: HnswParams | IvfParams, exact: ExactScorer, threads: int = 1
    ) -> None:
        import faiss  # only two-stage variants with an index need it

        faiss.omp_set_num_threads(threads)  # process-wide in FAISS; settings give one value
        self._faiss = faiss
        self.index, self.params, self.exact = index, params, exact
        self.n_items = int(index.ntotal)
        self.name = f"ann-{params.type}-{exact.matrix.precision}"

    def _search(self, users: np.ndarray, fetch: int, widen: int) -> np.ndarray:
        """Labels `[len(users), fetch]` (-1 where the index found fewer)."""
        faiss, p = self._faiss, self.params
        if isinstance(p, HnswParams):
            # HNSW returns at most efSearch results: never ask for fewer than wanted.
            params = faiss.SearchParametersHNSW(efSearch=max(p.ef_search * widen, fetch))
        else:
            params = faiss.SearchParametersIVF(nprobe=min(p.nprobe * widen, p.nlist))
        _, labels = self.index.search(users, fetch, params=params)
        return labels

    def top_k(
        self, users: np.ndarray, exclude: Sequence[np.ndarray | None], k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        users = np.ascontiguousarray(users, dtype=np.float32)
        batch = len(users)
        k = max(1, min(k, self.n_items))
        excluded = Exclusions(exclude, self.n_items + 1)
        need = np.minimum(k + excluded.counts, self.n_items)  # enough even if all are found
        left = np.minimum(k, self.n_items - excluded.counts)  # what a complete answer holds
        found_rows, found_ids = [], []
        todo = np.arange(batch)
        for attempt in range(MAX_TRIES):
            widen = 2**attempt
            fetch = int(min(self.n_items, need[todo].max() * widen))
            labels = self._search(users[todo], fetch, widen)
            rows = np.repeat(todo, fetch)
            ids = labels.reshape(-1) + 1  # label i is item id i + 1; -1 (none) becomes 0
            keep = (ids > 0) & ~excluded.contains(rows, ids)
            rows, ids = rows[keep], ids[keep]
            have = np.bincount(rows, minlength=batch)
            enough = have[todo] >= left[todo]
            done = todo[enough]
            take = np.isin(rows, done)
            found_rows.append(rows[take])
            found_ids.append(ids[take])
            todo = todo[~enough]
            if not len(todo):
                break
        rows, ids = np.concatenate(found_rows), np.concatenate(found_ids)
        scores = self.exact.score_pairs(users, rows, ids)
        top_scores, top_ids = select_top_k(rows, ids, scores, batch, k)
        if len(todo):  # the index keeps missing items for these rows: scan them exactly
            part_scores, part_ids = self.exact.top_k(users[todo], [exclude[r] for r in todo], k)
            top_scores[todo], top_ids[todo] = part_scores, part_ids
        return top_scores, top_ids
