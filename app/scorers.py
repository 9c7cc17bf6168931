"""The ranking step of a variant, chosen by its manifest: one protocol for every scorer.

- no `scorer` (full-score models): the engine returns scores for every item and `Ranker`
  masks and takes the top k (`app.ranking`);
- `scorer.kind == "exact"`: the engine returns user vectors and `ExactScorer` scans the
  item matrix;
- `scorer.kind == "ann"`: the same vectors go to `AnnScorer` (FAISS index).

The batcher, API, router and metrics see only `Ranking.top_k`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from app.engines import OUTPUT_NAME, USER_VECTOR_NAME
from app.ranking import Ranker
from model_store.manifest import Manifest


class Ranking(Protocol):
    name: str  # "full", "exact-int8", "ann-hnsw-fp32", ...

    def top_k(
        self, outputs: np.ndarray, exclude: Sequence[np.ndarray | None], k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(top_scores, top_ids) `[batch, k]` from the engine's outputs; excluded ids and id 0
        never appear; -inf scores mark places left empty."""
        ...


class FullRanker(Ranker):
    name = "full"


@dataclass
class RankingSetup:
    ranking: Ranking
    output: str  # the ONNX output the engine must return
    width: int  # its second dimension: n_items + 1 scores, or the user vector's size
    memory_bytes: dict[str, int] = field(default_factory=dict)  # what the ranking holds


def build_ranking(manifest: Manifest, folder: Path, threads: int) -> RankingSetup:
    n_items = manifest.dataset.n_items
    scorer = manifest.scorer
    if scorer is None:
        return RankingSetup(FullRanker(threads), OUTPUT_NAME, n_items + 1)
    # Only two-stage variants pay for these imports (and FAISS only with an index).
    from app.exact_scorer import ExactScorer
    from model_store.item_matrix import open_item_matrix

    matrix = open_item_matrix(folder, scorer, n_items)
    exact = ExactScorer(matrix, threads)
    memory = {"item_matrix_bytes": matrix.nbytes, "scorer_tables_bytes": exact.nbytes}
    ranking: Ranking = exact
    if scorer.kind == "ann":
        from app.ann_scorer import AnnScorer
        from model_store.ann_index import read_index

        assert scorer.index is not None and scorer.index_params is not None  # manifest rule
        index = read_index(folder / scorer.index, scorer.index_params, scorer.dim, n_items)
        ranking = AnnScorer(index, scorer.index_params, exact, threads)
        memory["index_bytes"] = manifest.artifacts[scorer.index].size_bytes
    return RankingSetup(ranking, USER_VECTOR_NAME, scorer.dim, memory)
