"""Product-quantized item embeddings: each item is M small codes into M trained codebooks.

Item vectors are `width` wide and cut into M sub-vectors of `width / M`; sub-vector m of
item i is row `codes[i, m]` of codebook m (K trained rows). An item then costs M codes
instead of `width` floats, so a small student can keep a wide item space: on ML-1M the
item table is most of a student's parameters, and shrinking its width (`emb_dim`) was what
cost students quality (README, "How big must an ML-1M student be?"). Jégou et al.,
"Product Quantization for Nearest Neighbor Search" (TPAMI 2011) for the quantizer; Lian et
al., "LightRec" (WWW 2020) and Chen et al., "Differentiable Product Quantization"
(ICML 2020) for trained codebooks in recommenders.

The codes are fixed during training; only the codebooks learn. `fit` takes them from a
source item matrix (a student takes its teacher's): truncated SVD to `width`, a fixed random
rotation (so every sub-space carries a similar share of the variance), then k-means per
sub-space (scikit-learn); the centroids start the codebooks. Items the teacher places close
together share codes, which is the knowledge the codes carry. Before `fit`, codes are
random.

Counting: the codes are not trained, but they are stored values a model needs, so
`SASRec.num_parameters` counts each code as one parameter (conservative: a code holds
log2(K) bits, not 32).

`weight` materializes `[n_items + 1, width]` (row 0, padding, is zero: code 0 of every
codebook is a fixed zero row) so lookup and scoring are those of a plain table. The ONNX
graph keeps codes and codebooks (`compression/onnx_graph.py`); ONNX Runtime folds them into
one matrix when a session starts, so a request pays nothing for the coding.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CodedEmbedding(nn.Module):
    def __init__(self, n_items: int, n_codebooks: int, n_centroids: int, width: int) -> None:
        super().__init__()
        if width % n_codebooks:
            raise ValueError(f"width={width} is not divisible by n_codebooks={n_codebooks}")
        self.n_codebooks, self.n_centroids, self.width = n_codebooks, n_centroids, width
        self.codebooks = nn.Parameter(
            torch.randn(n_codebooks, n_centroids, width // n_codebooks) * 0.02
        )
        # codes[i, m] in 1..K picks codebook m's row; 0 is the zero row (padding item only).
        codes = torch.randint(1, n_centroids + 1, (n_items + 1, n_codebooks))
        codes[0] = 0
        self.register_buffer("codes", codes)
        # Row offsets of each codebook in the flattened, zero-padded table.
        self.register_buffer(
            "offsets", torch.arange(n_codebooks) * (n_centroids + 1), persistent=False
        )

    @property
    def n_codes(self) -> int:
        """Stored codes (padding row excluded)."""
        return (self.codes.shape[0] - 1) * self.n_codebooks

    def table(self) -> Tensor:
        """`[M * (K + 1), width / M]`: every codebook with its zero row 0, stacked."""
        books = F.pad(self.codebooks, (0, 0, 1, 0))
        return books.reshape(-1, books.shape[-1])

    @property
    def weight(self) -> Tensor:
        """`[n_items + 1, width]`: row i is item i's vector (row 0, padding, is zero)."""
        rows = self.table()[self.codes + self.offsets]  # [n + 1, M, width / M]
        return rows.reshape(rows.shape[0], self.width)

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight)

    @torch.no_grad()
    def fit(self, source: np.ndarray, seed: int = 0) -> dict[str, float]:
        """Codes and starting codebooks from `source` (`[n_items + 1, w]`, row 0 padding, any
        width w). Returns how well the codes reproduce the source (for the log)."""
        from sklearn.cluster import KMeans

        n_rows = self.codes.shape[0]
        if source.ndim != 2 or source.shape[0] != n_rows:
            raise ValueError(
                f"source matrix has shape {source.shape}, expected ({n_rows}, width): one row "
                "per item id, padding included"
            )
        x = np.asarray(source[1:], dtype=np.float64)
        _, _, vt = np.linalg.svd(x, full_matrices=False)
        basis = vt[: self.width].T  # [w, <= width]
        if basis.shape[1] < self.width:  # a narrower source: pad the basis with zeros
            basis = np.pad(basis, ((0, 0), (0, self.width - basis.shape[1])))
        rng = np.random.default_rng(seed)
        rotation, _ = np.linalg.qr(rng.standard_normal((self.width, self.width)))
        y = x @ basis @ rotation  # [n, width]
        sub = self.width // self.n_codebooks
        k = self.n_centroids
        if k > len(x):
            raise ValueError(f"n_centroids={k} exceeds the {len(x)} items to cluster")
        codes = np.zeros((n_rows, self.n_codebooks), dtype=np.int64)
        books = np.zeros((self.n_codebooks, k, sub))
        for m in range(self.n_codebooks):
            part = y[:, m * sub : (m + 1) * sub]
            distinct, inverse = np.unique(part, axis=0, return_inverse=True)
            if len(distinct) <= k:  # k-means degenerates here: every distinct row a centroid
                codes[1:, m] = inverse.ravel() + 1
                books[m, : len(distinct)] = distinct
                continue
            km = KMeans(n_clusters=k, n_init=3, random_state=seed + m).fit(part)
            codes[1:, m] = km.labels_ + 1
            books[m] = km.cluster_centers_
        self.codes.copy_(torch.from_numpy(codes))
        self.codebooks.copy_(torch.from_numpy(books).to(self.codebooks.dtype))
        approx = self.weight.double().numpy()[1:] @ rotation.T @ basis.T
        return {
            "reconstruction_r2": 1.0 - float(((x - approx) ** 2).sum() / (x**2).sum()),
            "distinct_items": float(len(np.unique(codes[1:], axis=0))),
        }
