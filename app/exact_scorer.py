"""Exact top-k of user vectors over a stored item matrix (fp32 or int8), in blocks.

One ONNX Runtime call multiplies the batch's user vectors `[batch, dim]` with a run of the
matrix's stored blocks `[g, dim, block_rows]` (a GEMM for the whole batch; `g` keeps the
scratch output at `SCRATCH_ELEMS` floats), then numpy keeps the items that can still reach
each row's top k (`app.candidates`). History items are set to -inf inside each block, the
padding row 0 always is, so they are never returned, ties included.

int8 (measured, 1M x 64, one thread, batch 1: numpy's int8 -> float32 conversion alone took
12 ms, as long as the fp32 product; ONNX Runtime's u8 x s8 product 2.2 ms): the user vector
is quantized too, to 7 bits (no u8 x s8 pair can saturate an int16, on CPUs without VNNI
either), which makes the product approximate with a known bound per row; the candidates
within that bound of the top k are then rescored exactly (dequantized rows . user vector),
so the result is the exact top k of the dequantized matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from onnx import TensorProto, helper

from app.candidates import CandidatePool, Exclusions, select_top_k
from model_store.item_matrix import ItemMatrix
from model_store.runtime import ort_session

SCRATCH_ELEMS = 1 << 18  # floats in one call's output (1 MB), whatever the batch size
MAX_ROWS = 64  # batch rows per scan; a larger batch is scanned in parts of this size
SEED_COLUMNS = 4096  # items whose bounds set the first thresholds before the scan
_OPSET = 17
USER_LEVELS = 63  # 7-bit user vector: |q| <= 63, stored as q + 64 in uint8 (1..127)


def _slack(dim: int) -> float:
    """Float32 rounding allowance of the bound, in units of scale x L1(row): the bound's own
    product, bias and sum round by less than 2e-5 of that, and the exact rescoring (a dim-term
    dot product, compared in units 63 times larger) by at most 63 * dim * 2**-24 of it."""
    return 1e-4 + 2 * USER_LEVELS * dim * 2.0**-24


def _graph(precision: str, dim: int) -> bytes:
    """upper [g, batch, rows] = users [batch, dim] x blocks [g, dim, rows] * scale + bias."""
    f32, vi = TensorProto.FLOAT, helper.make_tensor_value_info
    if precision == "int8":
        nodes = [
            helper.make_node("MatMulInteger", ["users", "blocks"], ["acc"]),
            helper.make_node("Cast", ["acc"], ["accf"], to=f32),
            helper.make_node("Mul", ["accf", "scale"], ["scaled"]),
            helper.make_node("Add", ["scaled", "bias"], ["upper"]),
        ]
        inputs = [
            vi("users", TensorProto.UINT8, ["batch", dim]),
            vi("blocks", TensorProto.INT8, ["g", dim, "rows"]),
            vi("scale", f32, ["g", 1, "rows"]),
            vi("bias", f32, ["g", 1, "rows"]),
        ]
    else:
        nodes = [
            helper.make_node("MatMul", ["users", "blocks"], ["product"]),
            helper.make_node("Add", ["product", "bias"], ["upper"]),
        ]
        inputs = [
            vi("users", f32, ["batch", dim]),
            vi("blocks", f32, ["g", dim, "rows"]),
            vi("bias", f32, ["g", 1, "rows"]),
        ]
    graph = helper.make_graph(
        nodes, "block_scores", inputs, [vi("upper", f32, ["g", "batch", "rows"])]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])
    model.ir_version = 8
    return model.SerializeToString()


class ExactScorer:
    """`top_k(user_vectors, exclude, k)` over every row of `matrix`, exact."""

    def __init__(self, matrix: ItemMatrix, threads: int = 1) -> None:
        self.matrix = matrix
        self.name = f"exact-{matrix.precision}"
        self._session = ort_session(_graph(matrix.precision, matrix.dim), threads)
        self._per_row()

    def _per_row(self) -> None:
        """Per stored row: bias (-inf masks row 0 and the padding of the last block) and, for
        int8, the scale and the width of the bound (12 bytes per row, computed once)."""
        m = self.matrix
        n_padded = m.blocks.shape[0] * m.block_rows
        bias = np.zeros(n_padded, dtype=np.float32)
        width = np.zeros(n_padded, dtype=np.float32)
        scale = np.zeros(n_padded, dtype=np.float32)
        if m.scales is not None:
            scale[: m.n_rows] = m.scales
            slack = _slack(m.dim)
            for j, block in enumerate(m.blocks):
                q = block.astype(np.int32)
                at = slice(j * m.block_rows, (j + 1) * m.block_rows)
                # The users operand is q_user + 64, so each product carries 64 * rowsum: the
                # bias takes it out. Half a quantization step of the user vector per component
                # moves a score by at most scale * L1(row) / 2 (in the product's units).
                half_width = scale[at] * np.abs(q).sum(axis=0) * (0.5 + slack)
                bias[at] = half_width - 64 * scale[at] * q.sum(axis=0)
                width[at] = 2 * half_width
        bias[0] = -np.inf
        bias[m.n_rows :] = -np.inf
        shape = (m.blocks.shape[0], 1, m.block_rows)
        self._bias, self._scale = bias.reshape(shape), scale.reshape(shape)
        self._width = width
        self.nbytes = int(
            bias.nbytes + (width.nbytes + scale.nbytes if m.scales is not None else 0)
        )

    def top_k(
        self, users: np.ndarray, exclude: Sequence[np.ndarray | None], k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(top_scores, top_ids), each `[batch, k]`, best first, score ties by lower id;
        -inf and id 0 where fewer than k items are left after the exclusions."""
        users = np.ascontiguousarray(users, dtype=np.float32)
        if users.ndim != 2 or users.shape[1] != self.matrix.dim:
            raise ValueError(
                f"user vectors have shape {users.shape}, the item matrix needs [batch, "
                f"{self.matrix.dim}]; the user model does not match its item matrix"
            )
        if not np.isfinite(users).all():
            raise ValueError("the user model returned non-finite user vectors")
        k = max(1, min(k, self.matrix.n_rows - 1))
        parts = [
            self._top_k(users[s : s + MAX_ROWS], exclude[s : s + MAX_ROWS], k)
            for s in range(0, len(users), MAX_ROWS)
        ]
        if len(parts) == 1:
            return parts[0]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _top_k(
        self, users: np.ndarray, exclude: Sequence[np.ndarray | None], k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        m, batch = self.matrix, len(users)
        rows_per_block = m.block_rows
        excluded = Exclusions(exclude, m.n_rows)
        pool = CandidatePool(batch, k)
        operand = self._operand(users)
        g = max(1, SCRATCH_ELEMS // (batch * rows_per_block))
        for j in range(0, m.blocks.shape[0], g):
            feeds = {"users": operand, "blocks": m.blocks[j : j + g], "bias": self._bias[j : j + g]}
            if m.scales is not None:
                feeds["scale"] = self._scale[j : j + g]
            upper = self._session.run(None, feeds)[0]  # [g, batch, rows]
            start = j * rows_per_block
            rows, ids = excluded.within(start, start + upper.shape[0] * rows_per_block)
            local = ids - start
            upper[local // rows_per_block, rows, local % rows_per_block] = -np.inf
            if j == 0:
                seed = min(SEED_COLUMNS, rows_per_block)
                pool.seed(upper[0, :, :seed] - self._width[:seed])
            # flatnonzero + divmod: 3-D np.nonzero took 2.8 ms per million entries here.
            flat = np.flatnonzero(upper >= pool.threshold[None, :, None])
            values = upper.reshape(-1)[flat]
            block, rest = np.divmod(flat, batch * rows_per_block)
            rows, col = np.divmod(rest, rows_per_block)
            ids = (j + block) * rows_per_block + col
            pool.add(rows, ids, values, values - self._width[ids])
        rows, ids, values = pool.finalists()
        if m.scales is not None:
            values = self.score_pairs(users, rows, ids)
        return select_top_k(rows, ids, values, batch, k)

    def _operand(self, users: np.ndarray) -> np.ndarray:
        if self.matrix.scales is None:
            return users
        # Per row: scaling a user vector does not change its ranking, only the bound's units.
        peak = np.abs(users).max(axis=1, keepdims=True)
        peak[peak == 0] = 1.0
        return (np.rint(users / peak * USER_LEVELS) + USER_LEVELS + 1).astype(np.uint8)

    def score_pairs(self, users: np.ndarray, rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Exact scores of items `ids` for user vectors `users[rows]`: stored row (int8 times
        its scale) . user vector, in float32."""
        if not len(ids):
            return np.empty(0, dtype=np.float32)
        return np.einsum("cd,cd->c", self.matrix.rows(ids), users[rows]).astype(np.float32)
