"""Quantization-aware fine-tuning for 4-bit weights: fake quantization of a SASRec's weights
on the exact grid `compression.quantize.int4` later stores them on.

`add_int4_fake_quant` puts a parametrization (`torch.nn.utils.parametrize`) on every weight
the int4 pass quantizes: the item and position tables (per row, [-7, 7], float16 scale) and
every `nn.Linear` (ONNX Runtime's symmetric int4: per output column over blocks of
`block_size` inputs, or the whole input with `block_size=None`; the value of largest
magnitude maps to -8; float16 scale). The forward pass sees quantized weights; gradients
pass straight through to the float weights (the straight-through estimator).
`bake_int4_fake_quant` then writes the quantized values into the weights, so the int4 pass
reproduces them exactly (tested) and post-training rounding loses nothing more.

Why our own few lines instead of `torch.ao`: its observers have no block-wise int4 grid with
ONNX Runtime's "-8 at the extreme" rule and float16 scales, and a different grid would leave
a rounding step between the fine-tuned weights and the stored ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from compression.quantize.int4 import INT4_QMAX, MIN_TABLE_ELEMENTS

_TINY = float(torch.finfo(torch.float16).smallest_normal) * 2.0**-10  # smallest subnormal


def _half(scale: Tensor) -> Tensor:
    """Scale rounded to float16, as stored."""
    return scale.to(torch.float16).to(scale.dtype)


class RowInt4(nn.Module):
    """Tables: one scale per row, values in [-7, 7] (`quantize_rows_int4`)."""

    def forward(self, weight: Tensor) -> Tensor:
        # `quantize_rows_int4`'s rule: the smallest float16 where a nonzero row's scale
        # rounds to 0, 1 for an all-zero row.
        absmax = weight.detach().abs().amax(dim=1, keepdim=True)
        scale = _half(absmax / INT4_QMAX)
        scale = torch.where((absmax > 0) & (scale == 0), torch.full_like(scale, _TINY), scale)
        scale = torch.where(absmax == 0, torch.ones_like(scale), scale)
        q = torch.clamp(torch.round(weight / scale), -INT4_QMAX, INT4_QMAX)
        return weight + (q * scale - weight).detach()


class ColumnInt4(nn.Module):
    """`nn.Linear` weights `[out, in]`: ONNX Runtime's symmetric int4 over blocks of inputs."""

    def __init__(self, block_size: int | None) -> None:
        super().__init__()
        self.block_size = block_size

    def forward(self, weight: Tensor) -> Tensor:
        n_out, n_in = weight.shape
        size = self.block_size or n_in
        pad = (-n_in) % size
        blocks = F.pad(weight, (0, pad)).reshape(n_out, -1, size)
        held = blocks.detach()
        extreme = torch.gather(held, 2, held.abs().argmax(dim=2, keepdim=True))
        scale = _half(extreme / -(INT4_QMAX + 1))
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.clamp(torch.round(blocks / scale), -(INT4_QMAX + 1), INT4_QMAX)
        quantized = (q * scale).reshape(n_out, -1)[:, :n_in]
        return weight + (quantized - weight).detach()


def _targets(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    found: list[tuple[nn.Module, nn.Module]] = []
    for module in model.modules():
        if isinstance(module, nn.Embedding) and module.weight.numel() >= MIN_TABLE_ELEMENTS:
            found.append((module, RowInt4()))
        elif isinstance(module, nn.Linear):
            found.append((module, ColumnInt4(None)))
    return found


def add_int4_fake_quant(model: nn.Module, block_size: int | None = None) -> int:
    """Parametrize the weights the int4 pass quantizes; returns how many."""
    targets = _targets(model)
    for module, quant in targets:
        if isinstance(quant, ColumnInt4):
            quant.block_size = block_size
        parametrize.register_parametrization(module, "weight", quant)
    return len(targets)


def bake_int4_fake_quant(model: nn.Module) -> int:
    """Replace each parametrized weight by its quantized value; returns how many."""
    baked = 0
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            baked += 1
    return baked
