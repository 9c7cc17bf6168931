"""The item matrix of a two-stage variant as .npy files: written offline, memory-mapped online.

Layout (`ScorerInfo` in manifest.py): rows 0..n_items (row 0 = padding) in blocks of
`block_rows` rows, each block transposed, shape `[n_blocks, dim, block_rows]`, the last block
zero-padded; int8 rows have one float32 scale per row in a second file, shape `[n_items + 1]`.
A block is the `[dim, block_rows]` operand of the scorer's matrix product, so the service maps
the file and multiplies blocks in place: 5M x 64 rows need no copy in memory. (Measured on
1M x 64 int8, one thread, batch 1: ONNX Runtime's u8 x s8 product took 2.2 ms with the items
as the `[dim, rows]` operand and 7.1 ms with them as `[rows, dim]`.)

Files are read with the header checked first (dtype, shape, byte order, file size) and then
`np.load(..., mmap_mode="r", allow_pickle=False)`: nothing is ever unpickled, and a file that
does not match its manifest is refused with the reason before any scoring.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from model_store.manifest import ScorerInfo

ITEM_MATRIX_FILE = "item_matrix.npy"
ITEM_SCALES_FILE = "item_scales.npy"
# Rows per stored block; any value works (the scorer multiplies several blocks per call).
DEFAULT_BLOCK_ROWS = 4096
INT8_MAX = 127
_DTYPES = {"fp32": np.dtype("<f4"), "int8": np.dtype("i1")}


class ItemMatrixError(ValueError):
    """An item-matrix file that cannot be used; the message names the file and the fix."""


def quantize_rows(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row: scale = max|row| / 127, values in [-127, 127].

    Per row because item vectors differ in norm (popular items grow larger): one scale for the
    whole matrix would spend most of the 8 bits on the few largest rows. An all-zero row (the
    padding row 0) gets scale 1 so nothing divides by zero.
    """
    matrix = np.asarray(matrix, dtype=np.float32)
    scale = np.abs(matrix).max(axis=1) / INT8_MAX
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(matrix / scale[:, None]), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q, scale.astype(np.float32)


def n_blocks(n_rows: int, block_rows: int) -> int:
    return -(-n_rows // block_rows)


def write_item_matrix(
    folder: Path,
    matrix: np.ndarray,
    precision: Literal["fp32", "int8"],
    block_rows: int = DEFAULT_BLOCK_ROWS,
) -> dict[str, Path]:
    """Write `matrix` (`[n_items + 1, dim]`, row 0 = padding) into `folder` in the stored
    layout; int8 is quantized per row (`quantize_rows`). Returns store name -> path.

    Written block by block through a memory map: 5M rows never need a second full copy."""
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] < 2 or matrix.shape[1] < 1:
        raise ItemMatrixError(
            f"item matrix has shape {matrix.shape}; expected [n_items + 1, dim] with row 0 "
            "for the padding id and at least one item"
        )
    if not np.issubdtype(matrix.dtype, np.floating) or not np.isfinite(matrix).all():
        raise ItemMatrixError(
            f"item matrix must hold finite floats (got dtype {matrix.dtype}); check the export"
        )
    if precision not in _DTYPES:
        raise ItemMatrixError(f"precision {precision!r}: use 'fp32' or 'int8'")
    if block_rows < 1:
        raise ItemMatrixError(f"block_rows={block_rows}: use a positive number of rows")
    rows, dim = matrix.shape
    folder.mkdir(parents=True, exist_ok=True)
    out = {ITEM_MATRIX_FILE: folder / ITEM_MATRIX_FILE}
    blocks = np.lib.format.open_memmap(
        out[ITEM_MATRIX_FILE], mode="w+", dtype=_DTYPES[precision],
        shape=(n_blocks(rows, block_rows), dim, block_rows),
    )  # fmt: skip
    scales = np.ones(rows, dtype=np.float32)
    for j in range(blocks.shape[0]):
        part = np.asarray(matrix[j * block_rows : (j + 1) * block_rows], dtype=np.float32)
        if precision == "int8":
            part, scales[j * block_rows : j * block_rows + len(part)] = quantize_rows(part)
        blocks[j, :, : len(part)] = part.T
        blocks[j, :, len(part) :] = 0
    blocks.flush()
    del blocks
    if precision == "int8":
        out[ITEM_SCALES_FILE] = folder / ITEM_SCALES_FILE
        np.save(out[ITEM_SCALES_FILE], scales, allow_pickle=False)
    return out


@dataclass(frozen=True)
class ItemMatrix:
    """A stored item matrix, memory-mapped (read-only) and checked against its manifest."""

    blocks: np.ndarray  # [n_blocks, dim, block_rows], int8 or float32
    scales: np.ndarray | None  # [n_rows] float32 for int8, else None
    n_rows: int  # n_items + 1
    precision: Literal["fp32", "int8"]

    @property
    def dim(self) -> int:
        return int(self.blocks.shape[1])

    @property
    def block_rows(self) -> int:
        return int(self.blocks.shape[2])

    @property
    def nbytes(self) -> int:
        return int(self.blocks.nbytes + (0 if self.scales is None else self.scales.nbytes))

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` as float32 `[len(ids), dim]`, int8 rows times their scale."""
        ids = np.asarray(ids, dtype=np.int64)
        out = self.blocks[ids // self.block_rows, :, ids % self.block_rows].astype(np.float32)
        if self.scales is not None:
            out *= self.scales[ids, None]
        return out


def open_item_matrix(folder: Path, scorer: ScorerInfo, n_items: int) -> ItemMatrix:
    """Map the matrix (and scales) a manifest's scorer names, after checking each file's
    header against it: dtype, shape, C order, file size."""
    rows = n_items + 1
    shape = (n_blocks(rows, scorer.block_rows), scorer.dim, scorer.block_rows)
    blocks = _load(folder / scorer.item_matrix, _DTYPES[scorer.precision], shape)
    scales = None
    if scorer.item_scales is not None:
        scales = _load(folder / scorer.item_scales, np.dtype("<f4"), (rows,))
    return ItemMatrix(blocks, scales, rows, scorer.precision)


def _load(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    fix = "publish the variant again with model_store.two_stage"
    try:
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read = {1: np.lib.format.read_array_header_1_0, 2: np.lib.format.read_array_header_2_0}
            if major not in read:
                raise ValueError(f".npy format version {major} is not supported")
            # The header is a Python literal parsed without evaluation; no data is read here.
            got_shape, fortran, got_dtype = read[major](f)
            offset = f.tell()
    except (OSError, ValueError) as exc:
        raise ItemMatrixError(f"{path}: not a readable .npy file ({exc}); {fix}") from None
    if got_dtype.hasobject or got_dtype != dtype:
        raise ItemMatrixError(
            f"{path}: dtype {got_dtype.str} but the manifest needs {dtype.str}; {fix}"
        )
    if tuple(got_shape) != shape or fortran:
        order = "Fortran" if fortran else "C"
        raise ItemMatrixError(
            f"{path}: shape {tuple(got_shape)} in {order} order but the manifest needs {shape} "
            f"in C order; {fix}"
        )
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    if path.stat().st_size != expected:
        raise ItemMatrixError(
            f"{path}: {path.stat().st_size} bytes, its header needs {expected}; {fix}"
        )
    return np.load(path, mmap_mode="r", allow_pickle=False)
