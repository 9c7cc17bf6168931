"""Structured pruning (blocks, attention heads, FFN neurons), a distillation fine-tune, and
unstructured magnitude pruning of a SASRec model.

Structured pruning gives a smaller *dense* model: a new `ModelConfig` (fewer blocks, fewer
heads, a narrower FFN) whose weights are the kept slices of the original. Every runtime runs
it faster without special kernels, and it exports to ONNX like any other model. Each block
keeps the same number of heads and neurons (one `ModelConfig` describes all blocks), chosen
per block by that block's own scores. A removed head keeps nothing of its width: the
attention becomes `n_heads * head_dim` wide (`ModelConfig.head_dim`), no longer `hidden`.

Importance scores (`PruneConfig.method`):

- `taylor` (default): the first-order estimate of how much the loss changes when a unit's
  output is switched off (Molchanov et al. 2017; for heads, Michel et al. 2019). A gate g = 1
  multiplies each head's output (before `proj`) and each FFN neuron's activation (before the
  second Linear); the score is |dL/dg| = |sum(a * dL/da)| summed over calibration batches,
  L the model's own training loss (full-softmax cross-entropy at every position). Chosen as
  the default because it measures what a unit does on real histories: weight norms ignore the
  LayerNorm gains in front of a unit, the statistics of its inputs and whether its output
  helps or hurts the prediction. It costs one forward and backward pass per batch.
- `l2`: data-free weight magnitudes, for when no histories are at hand. A head scores
  ||W_v,h||_F * ||W_proj[:, h]||_F (attention weights sum to 1, so the head adds a convex
  combination of its values mapped by `proj`; q and k decide where it looks, not how much it
  adds); a neuron scores ||[W1_j, b1_j]|| * ||W2[:, j]||.

Blocks are always scored by ablation: the calibration loss with the block skipped minus the
loss of the whole model (exact, and cheap: there are few blocks). Blocks go first; heads and
neurons are then scored in the model that keeps only the surviving blocks.

After structured pruning, `compression.distill.fine_tune` recovers quality by distillation with
the unpruned model as teacher (`DistillLoss` through `compression.model.train.train`).

`magnitude_prune` zeroes the smallest weights to a target sparsity. The tensors keep their
dense shapes: dense runtimes (PyTorch, ONNX Runtime CPU, TensorRT without 2:4 structured
sparsity) do exactly the same work and get no faster. It only pays when the weights are
stored sparse (CSR with fp32 values and int32 indices is smaller than dense only above 50%
sparsity) or run by a sparse kernel; the report gives both sizes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, StrictFloat, StrictInt, model_validator
from torch import Tensor, nn

from compression.configs import DistillConfig, ModelConfig, TrainConfig, _Strict
from compression.data.sequences import Split, pad_left
from compression.model.losses import sasrec_loss
from compression.model.sasrec import SASRec
from compression.model.train import TrainResult, training_pairs

Batch = tuple[Tensor, Tensor]  # (inputs, next-item targets), both int64 [batch, length]
Keep = StrictInt | StrictFloat


class PruneConfig(_Strict):
    """What to remove and how. `*_keep`: an int is a count, a float in (0, 1] a fraction."""

    heads_keep: Keep = Field(1.0, description="attention heads kept in every block")
    ffn_keep: Keep = Field(1.0, description="FFN neurons kept in every block (at least 4)")
    blocks_keep: Keep = Field(1.0, description="Transformer blocks kept")
    method: Literal["taylor", "l2"] = Field(
        "taylor", description="head/neuron importance: first-order Taylor on data, or weights"
    )
    calibration_batches: int = Field(8, ge=1, description="training batches used for scores")
    calibration_batch_size: int = Field(64, ge=1)
    fine_tune_epochs: int = Field(0, ge=0, description="distillation epochs after pruning")
    sparsity: float = Field(0.0, ge=0.0, lt=1.0, description="magnitude pruning; 0 = none")
    sparsity_scope: Literal["global", "per_layer"] = "global"
    sparsity_embedding: bool = Field(False, description="also prune the item embedding")
    seed: int = 0

    @model_validator(mode="after")
    def _keep_values(self) -> PruneConfig:
        for name in ("heads_keep", "ffn_keep", "blocks_keep"):
            value = getattr(self, name)
            if isinstance(value, float) and not 0.0 < value <= 1.0:
                raise ValueError(f"{name}={value}: a fraction must be in (0, 1]")
            if isinstance(value, int) and value < 1:
                raise ValueError(f"{name}={value}: a count must be at least 1")
        return self

    @property
    def removes_structure(self) -> bool:
        keeps = (self.heads_keep, self.ffn_keep, self.blocks_keep)
        return any(isinstance(k, int) or k < 1.0 for k in keeps)


def keep_count(keep: int | float, total: int, name: str, minimum: int = 1) -> int:
    """Units to keep out of `total`: a count as given, a fraction rounded (at least `minimum`)."""
    if isinstance(keep, int):
        if keep > total:
            raise ValueError(f"{name}={keep} but the model has only {total}")
        if keep < minimum:
            raise ValueError(f"{name}={keep}: at least {minimum} must stay")
        return keep
    return min(total, max(minimum, round(keep * total)))


@dataclass(frozen=True)
class Removed:
    kind: Literal["block", "head", "ffn"]
    block: int  # block index in the original model
    index: int  # head or neuron index in that block (the block index again for a block)
    score: float


@dataclass
class PruneReport:
    method: str
    params_before: int
    params_after: int
    config_before: dict[str, Any]
    config_after: dict[str, Any]
    block_scores: list[float]  # per original block: calibration loss increase without it
    head_scores: dict[int, list[float]]  # original block index -> score per head
    ffn_scores: dict[int, list[float]]  # original block index -> score per neuron
    removed: list[Removed] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(r.kind == kind for r in self.removed)

    def summary(self) -> str:
        b, a = self.config_before, self.config_after
        return (
            f"{self.method}: blocks {b['n_blocks']} -> {a['n_blocks']}, heads per block "
            f"{b['n_heads']} -> {a['n_heads']}, ffn {b['ffn'] or b['hidden']} -> {a['ffn']}; "
            f"params {self.params_before:,} -> {self.params_after:,} "
            f"({self.params_after / self.params_before:.1%})"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- calibration data


def calibration_batches(
    split: Split, max_len: int, n_batches: int = 8, batch_size: int = 64, seed: int = 0
) -> list[Batch]:
    """Random training (input, target) pairs, left-padded like training batches."""
    inputs, targets = training_pairs(split.train, max_len)
    if not inputs:
        raise ValueError("no user has 2+ training items; nothing to calibrate on")
    rng = np.random.default_rng(seed)
    n = min(len(inputs), n_batches * batch_size)
    chosen = rng.choice(len(inputs), size=n, replace=False)
    out = []
    for start in range(0, n, batch_size):
        idx = chosen[start : start + batch_size]
        x = pad_left([inputs[i] for i in idx], max_len)
        y = pad_left([targets[i] for i in idx], max_len, length=x.shape[1])
        out.append((torch.from_numpy(x), torch.from_numpy(y)))
    return out


LossFn = Callable[[SASRec, Tensor, Tensor], Tensor]


def _mean_loss(model: SASRec, batches: Sequence[Batch], loss_fn: LossFn) -> float:
    with torch.no_grad():
        return float(np.mean([float(loss_fn(model, x, y)) for x, y in batches]))


# ---------------------------------------------------------------- importance scores


def block_scores(model: SASRec, batches: Sequence[Batch], loss_fn: LossFn) -> list[float]:
    """Per block: mean calibration loss with that block skipped minus the full model's."""
    base = _mean_loss(model, batches, loss_fn)
    blocks = model.blocks
    scores = []
    try:
        for skip in range(len(blocks)):
            model.blocks = nn.ModuleList(b for i, b in enumerate(blocks) if i != skip)
            scores.append(_mean_loss(model, batches, loss_fn) - base)
    finally:
        model.blocks = blocks
    return scores


def taylor_scores(
    model: SASRec, batches: Sequence[Batch], loss_fn: LossFn
) -> tuple[list[Tensor], list[Tensor]]:
    """Per block: |dL/dg| of a gate on each head's output and each FFN neuron (mean/batch)."""
    head_gates, ffn_gates, handles = [], [], []
    for block in model.blocks:
        hg = torch.ones(block.attn.n_heads, requires_grad=True)
        fg = torch.ones(block.ffn[2].in_features, requires_grad=True)
        d = block.attn.head_dim

        def gate_heads(_m: nn.Module, args: tuple[Tensor], g: Tensor = hg, d: int = d) -> Any:
            return (args[0] * g.repeat_interleave(d),)

        def gate_ffn(_m: nn.Module, args: tuple[Tensor], g: Tensor = fg) -> Any:
            return (args[0] * g,)

        handles.append(block.attn.proj.register_forward_pre_hook(gate_heads))
        handles.append(block.ffn[2].register_forward_pre_hook(gate_ffn))
        head_gates.append(hg)
        ffn_gates.append(fg)
    heads = [torch.zeros_like(g) for g in head_gates]
    ffn = [torch.zeros_like(g) for g in ffn_gates]
    try:
        for x, y in batches:
            grads = torch.autograd.grad(loss_fn(model, x, y), head_gates + ffn_gates)
            for acc, g in zip(heads + ffn, grads, strict=True):
                acc += g.abs()
    finally:
        for h in handles:
            h.remove()
    return [h / len(batches) for h in heads], [f / len(batches) for f in ffn]


def l2_scores(model: SASRec) -> tuple[list[Tensor], list[Tensor]]:
    """Per block: value-path weight norm of each head, in/out weight norm of each neuron."""
    heads, ffn = [], []
    with torch.no_grad():
        for block in model.blocks:
            n, d = block.attn.n_heads, block.attn.head_dim
            inner = n * d
            v = block.attn.qkv.weight[2 * inner :].reshape(n, d, -1)
            p = block.attn.proj.weight.T.reshape(n, d, -1)
            heads.append(v.flatten(1).norm(dim=1) * p.flatten(1).norm(dim=1))
            w1, b1, w2 = block.ffn[0].weight, block.ffn[0].bias, block.ffn[2].weight
            ffn.append(torch.cat([w1, b1[:, None]], dim=1).norm(dim=1) * w2.norm(dim=0))
    return heads, ffn


def _top(scores: Tensor, k: int) -> list[int]:
    """Indices of the k highest scores, in their original order (ties: lower index wins)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


# ---------------------------------------------------------------- slicing


def _sliced_state(
    model: SASRec, blocks: list[int], heads: dict[int, list[int]], neurons: dict[int, list[int]]
) -> dict[str, Tensor]:
    sd = model.state_dict()
    out = {k: v for k, v in sd.items() if not k.startswith("blocks.")}
    for new_i, old_i in enumerate(blocks):
        src, dst = f"blocks.{old_i}.", f"blocks.{new_i}."
        out.update({dst + k[len(src) :]: v for k, v in sd.items() if k.startswith(src)})
        attn = model.blocks[old_i].attn
        d, inner = attn.head_dim, attn.n_heads * attn.head_dim
        cols = torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads[old_i]])
        rows = torch.cat([part * inner + cols for part in range(3)])
        keep = torch.tensor(neurons[old_i])
        out[dst + "attn.qkv.weight"] = sd[src + "attn.qkv.weight"][rows]
        out[dst + "attn.qkv.bias"] = sd[src + "attn.qkv.bias"][rows]
        out[dst + "attn.proj.weight"] = sd[src + "attn.proj.weight"][:, cols]
        out[dst + "ffn.0.weight"] = sd[src + "ffn.0.weight"][keep]
        out[dst + "ffn.0.bias"] = sd[src + "ffn.0.bias"][keep]
        out[dst + "ffn.2.weight"] = sd[src + "ffn.2.weight"][:, keep]
    return {k: v.clone() for k, v in out.items()}


def pruned_config(cfg: ModelConfig, n_blocks: int, n_heads: int, ffn: int) -> ModelConfig:
    """The config of the pruned model (validated); `head_dim` is set only where it must be."""
    d = cfg.attn_head_dim
    default_d = cfg.hidden // n_heads if cfg.hidden % n_heads == 0 else None
    return ModelConfig(
        **{
            **cfg.model_dump(),
            "n_blocks": n_blocks,
            "n_heads": n_heads,
            "ffn": ffn,
            "head_dim": None if default_d == d else d,
        }
    )


def structured_prune(
    model: SASRec, cfg: PruneConfig, batches: Sequence[Batch] | None = None
) -> tuple[SASRec, PruneReport]:
    """A new, smaller dense SASRec with the most important blocks, heads and FFN neurons.

    `batches` (see `calibration_batches`) are needed for the `taylor` method and to remove
    blocks. The input model is left unchanged.
    """
    mc = model.cfg
    n_blocks = keep_count(cfg.blocks_keep, mc.n_blocks, "blocks_keep")
    n_heads = keep_count(cfg.heads_keep, mc.n_heads, "heads_keep")
    n_ffn = keep_count(cfg.ffn_keep, mc.ffn_width, "ffn_keep", minimum=min(4, mc.ffn_width))
    prunes_units = n_heads < mc.n_heads or n_ffn < mc.ffn_width
    needs_data = n_blocks < mc.n_blocks or (cfg.method == "taylor" and prunes_units)
    if needs_data and not batches:
        raise ValueError(
            "calibration batches are needed for method='taylor' and for removing blocks "
            "(compression.model.prune.calibration_batches)"
        )
    work = copy.deepcopy(model).eval()
    for p in work.parameters():
        p.requires_grad_(False)
    loss_fn = sasrec_loss("full")

    b_scores: list[float] = []
    kept_blocks = list(range(mc.n_blocks))
    if n_blocks < mc.n_blocks:
        assert batches is not None
        b_scores = block_scores(work, batches, loss_fn)
        kept_blocks = _top(torch.tensor(b_scores), n_blocks)
        work.blocks = nn.ModuleList(work.blocks[i] for i in kept_blocks)

    h_list: list[Tensor] = []
    f_list: list[Tensor] = []
    if prunes_units:
        if cfg.method == "taylor":
            assert batches is not None
            h_list, f_list = taylor_scores(work, batches, loss_fn)
        else:
            h_list, f_list = l2_scores(work)
    full_heads, full_ffn = list(range(mc.n_heads)), list(range(mc.ffn_width))
    heads = {
        b: _top(h_list[i], n_heads) if h_list else full_heads for i, b in enumerate(kept_blocks)
    }
    neurons = {b: _top(f_list[i], n_ffn) if f_list else full_ffn for i, b in enumerate(kept_blocks)}

    new_cfg = pruned_config(mc, n_blocks, n_heads, n_ffn)
    pruned = SASRec(new_cfg)
    pruned.load_state_dict(_sliced_state(model, kept_blocks, heads, neurons))
    pruned.train(model.training)

    removed = [Removed("block", b, b, b_scores[b]) for b in range(mc.n_blocks) if b not in heads]
    head_scores, ffn_scores = {}, {}
    for i, b in enumerate(kept_blocks):
        if h_list:
            head_scores[b] = [float(s) for s in h_list[i]]
            removed += [
                Removed("head", b, h, head_scores[b][h]) for h in full_heads if h not in heads[b]
            ]
        if f_list:
            ffn_scores[b] = [float(s) for s in f_list[i]]
            kept = set(neurons[b])
            removed += [Removed("ffn", b, j, ffn_scores[b][j]) for j in full_ffn if j not in kept]
    report = PruneReport(
        method=cfg.method,
        params_before=model.num_parameters(),
        params_after=pruned.num_parameters(),
        config_before=mc.model_dump(),
        config_after=new_cfg.model_dump(),
        block_scores=b_scores,
        head_scores=head_scores,
        ffn_scores=ffn_scores,
        removed=removed,
    )
    return pruned, report


# ---------------------------------------------------------------- magnitude pruning


@dataclass(frozen=True)
class TensorSparsity:
    name: str
    shape: tuple[int, ...]
    zeros: int
    numel: int
    dense_bytes: int
    csr_bytes: int  # fp32 values + int32 column indices + int32 row pointers

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel


@dataclass
class SparsityReport:
    target: float
    scope: str
    reached: float  # zeros / weights over the pruned tensors
    tensors: list[TensorSparsity]
    model_dense_bytes: int  # every parameter dense
    model_sparse_bytes: int  # pruned tensors in CSR, the rest dense

    def summary(self) -> str:
        return (
            f"sparsity {self.reached:.1%} ({self.scope}, target {self.target:.1%}) over "
            f"{len(self.tensors)} tensors; {self.model_dense_bytes / 1e6:.2f} MB dense, "
            f"{self.model_sparse_bytes / 1e6:.2f} MB with those stored as CSR"
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for t, src in zip(out["tensors"], self.tensors, strict=True):
            t["sparsity"] = src.sparsity
        return out


def csr_bytes(weight: Tensor, index_bytes: int = 4) -> int:
    """Bytes of `weight` (2-D) as CSR: non-zero values, their column indices, row pointers.

    Same layout as `torch.Tensor.to_sparse_csr`, whose indices are int64 by default (8 bytes;
    then CSR beats dense fp32 only above 2/3 sparsity); int32 indices suffice here.
    """
    nnz = int(torch.count_nonzero(weight))
    return nnz * weight.element_size() + (nnz + weight.shape[0] + 1) * index_bytes


def _prunable(model: SASRec, include_embedding: bool) -> list[tuple[str, Tensor]]:
    out = [(f"{n}.weight", m.weight) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if include_embedding:
        out.append(("item_emb.weight", model.item_emb.weight))
    return out


def _zero_smallest(flat: Tensor, k: int) -> Tensor:
    """Bool mask of the k smallest |values| (exactly k, ties broken by position)."""
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    if k > 0:
        mask[torch.topk(flat.abs(), k, largest=False, sorted=False).indices] = True
    return mask


def magnitude_prune(
    model: SASRec,
    sparsity: float,
    scope: Literal["global", "per_layer"] = "global",
    include_embedding: bool = False,
) -> tuple[SASRec, SparsityReport]:
    """A copy of `model` with the smallest-magnitude weights set to zero.

    Applies to every Linear weight (biases and LayerNorms stay) and, with
    `include_embedding`, to the item embedding (the output matrix too when tied).
    `global` ranks all those weights together, `per_layer` prunes each tensor to `sparsity`.
    The model keeps its dense shapes: it is no faster on dense runtimes (see module docstring).
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity} must be in [0, 1)")
    pruned = copy.deepcopy(model)
    targets = _prunable(pruned, include_embedding)
    with torch.no_grad():
        if scope == "global":
            flat = torch.cat([w.flatten() for _, w in targets])
            mask = _zero_smallest(flat, round(sparsity * flat.numel()))
            for (_, w), m in zip(targets, mask.split([w.numel() for _, w in targets]), strict=True):
                w.masked_fill_(m.view(w.shape), 0.0)
        elif scope == "per_layer":
            for _, w in targets:
                w.masked_fill_(
                    _zero_smallest(w.flatten(), round(sparsity * w.numel())).view(w.shape), 0.0
                )
        else:
            raise ValueError(f"scope must be 'global' or 'per_layer', got {scope!r}")
    tensors = [
        TensorSparsity(
            name=name,
            shape=tuple(w.shape),
            zeros=int((w == 0).sum()),
            numel=w.numel(),
            dense_bytes=w.numel() * w.element_size(),
            csr_bytes=csr_bytes(w),
        )
        for name, w in targets
    ]
    dense = sum(p.numel() * p.element_size() for p in pruned.parameters())
    report = SparsityReport(
        target=sparsity,
        scope=scope,
        reached=sum(t.zeros for t in tensors) / sum(t.numel for t in tensors),
        tensors=tensors,
        model_dense_bytes=dense,
        model_sparse_bytes=dense - sum(t.dense_bytes - t.csr_bytes for t in tensors),
    )
    return pruned, report


# ---------------------------------------------------------------- the whole recipe


@dataclass
class PruneResult:
    model: SASRec
    structured: PruneReport | None
    fine_tune: TrainResult | None
    sparsity: SparsityReport | None


def prune(
    model: SASRec,
    cfg: PruneConfig,
    split: Split | None = None,
    train_cfg: TrainConfig | None = None,
    distill_cfg: DistillConfig | None = None,
    log: Callable[[str], None] = print,
) -> PruneResult:
    """Structured pruning, then (`fine_tune_epochs` > 0) distillation from the unpruned
    model, then (`sparsity` > 0) magnitude pruning. Calibration batches come from `split`."""
    current, structured, tuned, sparse = model, None, None, None
    if cfg.removes_structure:
        batches = None
        if split is not None:
            batches = calibration_batches(
                split,
                model.cfg.max_len,
                cfg.calibration_batches,
                cfg.calibration_batch_size,
                cfg.seed,
            )
        current, structured = structured_prune(model, cfg, batches)
        log(structured.summary())
    if cfg.fine_tune_epochs:
        from compression.distill.fine_tune import fine_tune

        if split is None:
            raise ValueError("fine_tune_epochs > 0 needs the training split")
        tuned = fine_tune(
            current,
            model,
            split,
            train_cfg or TrainConfig(),
            distill_cfg or DistillConfig(),
            epochs=cfg.fine_tune_epochs,
            log=log,
        )
        current = tuned.model
    if cfg.sparsity > 0:
        current, sparse = magnitude_prune(
            current, cfg.sparsity, cfg.sparsity_scope, cfg.sparsity_embedding
        )
        log(sparse.summary())
    return PruneResult(current, structured, tuned, sparse)
