"""The optional approximate index of a two-stage variant: FAISS, built at publish time.

FAISS (`faiss-cpu`) because it has both index families worth measuring here (HNSW and IVF,
flat or 8-bit codes) for inner product, releases the GIL while it searches, and writes its
indices in its own binary format (`faiss.write_index`), never pickle. The index holds rows
1..n_items of the matrix the service scores (int8 rows dequantized), so FAISS label i is
internal item id i + 1. Reading maps the stored vectors (`IO_FLAG_MMAP_IFC`) instead of copying
them. FAISS is imported only here, and only when an index is built or read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from model_store.manifest import HnswParams, IvfParams

INDEX_FILE = "item_index.faiss"


class AnnIndexError(ValueError):
    """An index that cannot be built or read; the message names the file and the fix."""


def faiss_module() -> Any:
    """The faiss module, or an error that says how to install it."""
    try:
        import faiss
    except ImportError as exc:
        raise AnnIndexError(
            "approximate indices need faiss-cpu (`pip install 'recsys-serve[serve]'`)"
        ) from exc
    return faiss


def build_index(
    vectors: np.ndarray, params: HnswParams | IvfParams, threads: int = 1, seed: int = 0
) -> Any:
    """An inner-product index over `vectors` (`[n_items, dim]` float32: rows 1..n_items)."""
    faiss = faiss_module()
    faiss.omp_set_num_threads(threads)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    ip = faiss.METRIC_INNER_PRODUCT
    if isinstance(params, HnswParams):
        index = faiss.IndexHNSWFlat(dim, params.m, ip)
        index.hnsw.efConstruction = params.ef_construction
        index.hnsw.efSearch = params.ef_search
    else:
        if params.nlist > n:
            raise AnnIndexError(f"nlist={params.nlist} exceeds the {n} items; use nlist <= items")
        encoding = "Flat" if params.encoding == "flat" else "SQ8"
        index = faiss.index_factory(dim, f"IVF{params.nlist},{encoding}", ip)
        # k-means on a seeded sample: 64 points per cell is FAISS's own recommendation.
        rng = np.random.default_rng(seed)
        sample = vectors[np.sort(rng.choice(n, min(n, 64 * params.nlist), replace=False))]
        index.cp.seed = seed
        index.train(sample)
        index.nprobe = params.nprobe
    index.add(vectors)
    return index


def write_index(index: Any, path: Path) -> None:
    faiss_module().write_index(index, str(path))


def read_index(path: Path, params: HnswParams | IvfParams, dim: int, n_items: int) -> Any:
    """Read an index (its checksum already verified by the store) and check it against the
    manifest: type, dimension, metric and item count."""
    faiss = faiss_module()
    fix = "publish the variant again with model_store.two_stage"
    try:
        # Older FAISS builds lack the flag: they read the vectors into memory instead.
        index = faiss.read_index(str(path), getattr(faiss, "IO_FLAG_MMAP_IFC", 0))
    except RuntimeError as exc:
        raise AnnIndexError(f"{path}: FAISS cannot read it ({str(exc)[:200]}); {fix}") from None
    want = faiss.IndexHNSWFlat if isinstance(params, HnswParams) else faiss.IndexIVF
    problems = [
        f"type {type(index).__name__}, manifest says {params.type}"
        if not isinstance(index, want) else "",
        f"dimension {index.d}, manifest says {dim}" if index.d != dim else "",
        f"{index.ntotal} vectors, the catalogue has {n_items}" if index.ntotal != n_items else "",
        "metric is not inner product" if index.metric_type != faiss.METRIC_INNER_PRODUCT else "",
    ]  # fmt: skip
    problems = [p for p in problems if p]
    if problems:
        raise AnnIndexError(f"{path}: {'; '.join(problems)}; {fix}")
    if isinstance(params, IvfParams):
        index.nprobe = params.nprobe
    return index
