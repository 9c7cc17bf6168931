"""Pruning: exact slicing, the scores, export of a pruned model, the fine-tune, sparsity."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from compression.configs import DistillConfig, ModelConfig, TrainConfig
from compression.data.sequences import leave_one_out
from compression.data.synthetic import SyntheticConfig, synthetic_dataset
from compression.distill.fine_tune import fine_tune
from compression.evaluate.metrics import evaluate_model
from compression.export.exporter import check_parity, export_onnx
from compression.model.prune import (
    PruneConfig,
    calibration_batches,
    csr_bytes,
    keep_count,
    magnitude_prune,
    prune,
    structured_prune,
)
from compression.model.sasrec import SASRec
from compression.model.train import load_checkpoint, save_checkpoint, train

N_ITEMS = 30


def tiny(seed: int = 0, **kw: object) -> SASRec:
    torch.manual_seed(seed)
    base: dict = {"n_items": N_ITEMS, "max_len": 10, "hidden": 16, "n_heads": 4, "n_blocks": 3}
    return SASRec(ModelConfig(**{**base, "ffn": 24, **kw})).eval()


def random_batches(n: int = 2, size: int = 8, length: int = 10) -> list:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        seq = torch.randint(1, N_ITEMS + 1, (size, length + 1), generator=g)
        seq[:3, :4] = 0  # some left padding
        out.append((seq[:, :-1], torch.where(seq[:, :-1] > 0, seq[:, 1:], 0)))
    return out


def with_units_zeroed(model: SASRec, report) -> SASRec:
    """The original model with every removed unit's output switched off (zero weights)."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for r in report.removed:
            block = m.blocks[r.block]
            if r.kind == "head":
                d = block.attn.head_dim
                block.attn.proj.weight[:, r.index * d : (r.index + 1) * d] = 0
            elif r.kind == "ffn":
                block.ffn[2].weight[:, r.index] = 0
            else:  # a block with both branches zeroed is the identity
                for lin in (block.attn.proj, block.ffn[2]):
                    lin.weight.zero_()
                    lin.bias.zero_()
    return m


def test_head_dim_config_is_backwards_compatible(tmp_path: Path) -> None:
    old = ModelConfig(n_items=5, hidden=16, n_heads=4)
    assert old.head_dim is None and old.attn_head_dim == 4
    with pytest.raises(ValidationError, match="not divisible"):
        ModelConfig(n_items=5, hidden=16, n_heads=3)
    cfg = ModelConfig(n_items=5, hidden=16, n_heads=3, head_dim=4)  # inner width 12
    m = SASRec(cfg)
    assert m.blocks[0].attn.qkv.weight.shape == (36, 16)
    assert m.blocks[0].attn.proj.weight.shape == (16, 12)
    assert m(torch.tensor([[1, 2, 3]])).shape == (1, 6)
    # a checkpoint written before head_dim existed has no such key and loads unchanged
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = tmp_path / "model.safetensors"
    save_checkpoint(path, tiny())
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    config = json.loads(metadata["config"])
    config.pop("head_dim")
    save_file(load_file(str(path)), str(path), metadata={**metadata, "config": json.dumps(config)})
    assert load_checkpoint(path).cfg.attn_head_dim == 4


def test_config_validation_and_counts() -> None:
    with pytest.raises(ValidationError, match="extra"):
        PruneConfig(head_keep=0.5)
    for bad in ({"heads_keep": 0.0}, {"ffn_keep": 1.5}, {"blocks_keep": 0}, {"heads_keep": True}):
        with pytest.raises(ValidationError):
            PruneConfig(**bad)
    assert not PruneConfig().removes_structure
    assert PruneConfig(heads_keep=1).removes_structure  # the int 1 is a count: one head
    assert keep_count(0.5, 4, "h") == 2 and keep_count(3, 4, "h") == 3
    assert keep_count(0.01, 128, "f", minimum=4) == 4
    with pytest.raises(ValueError, match="only 4"):
        keep_count(5, 4, "heads_keep")


@pytest.mark.parametrize("method", ["l2", "taylor"])
def test_pruned_model_equals_original_with_removed_units_switched_off(method: str) -> None:
    model = tiny()
    cfg = PruneConfig(heads_keep=3, ffn_keep=0.5, blocks_keep=2, method=method)
    pruned, report = structured_prune(model, cfg, random_batches())
    c = pruned.cfg
    assert (c.n_blocks, c.n_heads, c.ffn, c.attn_head_dim, c.head_dim) == (2, 3, 12, 4, 4)
    assert report.count("block") == 1 and report.count("head") == 2 and report.count("ffn") == 24
    assert report.params_after == pruned.num_parameters() < report.params_before
    assert report.params_before == model.num_parameters()
    reference = with_units_zeroed(model, report)
    seqs = torch.randint(1, N_ITEMS + 1, (5, 10))
    seqs[0, :6] = 0
    with torch.no_grad():
        assert torch.allclose(pruned(seqs), reference(seqs), atol=1e-5)
        assert torch.allclose(pruned.encode(seqs), reference.encode(seqs), atol=1e-5)
    # the removed units are the lowest-scored ones, per block
    for r in report.removed:
        if r.kind == "head":
            kept = [s for h, s in enumerate(report.head_scores[r.block]) if h != r.index]
            assert r.score <= sorted(kept)[-3]


def test_keep_everything_is_identity_and_input_untouched() -> None:
    model = tiny()
    before = copy.deepcopy(model.state_dict())
    pruned, report = structured_prune(model, PruneConfig())  # no data needed: nothing to score
    seqs = torch.randint(1, N_ITEMS + 1, (3, 7))
    with torch.no_grad():
        assert torch.equal(pruned(seqs), model(seqs))
    assert report.removed == [] and pruned.cfg == model.cfg
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("method", ["l2", "taylor"])
def test_dead_units_score_zero_and_go_first(method: str) -> None:
    model = tiny(n_blocks=2)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.proj.weight[:, 4:8] = 0  # head 1 contributes nothing
            block.ffn[2].weight[:, [3, 7]] = 0  # neurons 3 and 7 neither
    cfg = PruneConfig(heads_keep=3, ffn_keep=22, method=method)
    _, report = structured_prune(model, cfg, random_batches())
    heads = {(r.block, r.index) for r in report.removed if r.kind == "head"}
    neurons = {(r.block, r.index) for r in report.removed if r.kind == "ffn"}
    assert heads == {(0, 1), (1, 1)}
    assert neurons == {(b, j) for b in (0, 1) for j in (3, 7)}
    assert all(abs(r.score) < 1e-9 for r in report.removed)


def test_block_scores_are_the_loss_increase() -> None:
    model = tiny()
    with torch.no_grad():  # block 1 is the identity: removing it changes nothing
        for lin in (model.blocks[1].attn.proj, model.blocks[1].ffn[2]):
            lin.weight.zero_()
            lin.bias.zero_()
    _, report = structured_prune(model, PruneConfig(blocks_keep=2, method="l2"), random_batches())
    assert abs(report.block_scores[1]) < 1e-6
    (removed,) = report.removed
    assert removed.score == min(report.block_scores)


def test_data_is_required_where_scores_need_it() -> None:
    with pytest.raises(ValueError, match="calibration batches"):
        structured_prune(tiny(), PruneConfig(heads_keep=0.5))  # taylor
    with pytest.raises(ValueError, match="calibration batches"):
        structured_prune(tiny(), PruneConfig(blocks_keep=1, method="l2"))
    pruned, _ = structured_prune(tiny(), PruneConfig(heads_keep=0.5, method="l2"))
    # 2 heads of width 4 in hidden 16: 16 // 2 = 8 would be wrong, so head_dim is explicit
    assert (pruned.cfg.n_heads, pruned.cfg.head_dim) == (2, 4)


def test_pruned_model_exports_to_onnx_with_parity(tmp_path: Path) -> None:
    pruned, _ = structured_prune(
        tiny(), PruneConfig(heads_keep=3, ffn_keep=0.5, blocks_keep=2), random_batches()
    )
    assert pruned.cfg.hidden % pruned.cfg.n_heads  # 3 heads of 4 in hidden 16
    path = tmp_path / "pruned.onnx"
    export_onnx(pruned, path)
    rng = np.random.default_rng(0)
    hist = [rng.integers(1, N_ITEMS + 1, size=rng.integers(1, 15)) for _ in range(20)]
    report = check_parity(pruned, path, hist, batch_size=6)
    assert report.top10_agreement == 1.0


@pytest.fixture(scope="module")
def trained() -> tuple:
    data = synthetic_dataset(SyntheticConfig(users=200, items=40, max_len=12, min_len=5))
    split = leave_one_out(data)
    cfg = ModelConfig(n_items=data.n_items, max_len=12, hidden=16, n_heads=2, n_blocks=2)
    tc = TrainConfig(max_epochs=3, lr=5e-3, threads=1)
    return train(cfg, tc, split, progress=False, log=lambda _: None).model, split


def test_fine_tune_starts_from_the_pruned_weights(trained: tuple) -> None:
    teacher, split = trained
    batches = calibration_batches(split, teacher.cfg.max_len, n_batches=2, batch_size=32)
    assert len(batches) == 2 and batches[0][0].shape == batches[0][1].shape
    pruned, _ = structured_prune(teacher, PruneConfig(heads_keep=1, ffn_keep=0.5), batches)
    tc = TrainConfig(lr=1e-12, threads=1)
    result = fine_tune(pruned, teacher, split, tc, DistillConfig(), epochs=1, log=lambda _: None)
    assert result.epochs_run == 1 and result.model.cfg == pruned.cfg
    for k, v in pruned.state_dict().items():  # a negligible step: the weights are the pruned ones
        assert torch.allclose(result.model.state_dict()[k], v, atol=1e-6), k
    with pytest.raises(ValueError, match="init_model"):
        train(teacher.cfg, tc, split, init_model=pruned, progress=False)


def test_recipe_prunes_fine_tunes_and_sparsifies(trained: tuple) -> None:
    teacher, split = trained
    cfg = PruneConfig(heads_keep=1, ffn_keep=0.5, fine_tune_epochs=1, sparsity=0.5)
    tc = TrainConfig(lr=5e-3, threads=1)
    result = prune(teacher, cfg, split, tc, DistillConfig(alpha=1.0), log=lambda _: None)
    assert result.structured is not None and result.fine_tune is not None
    assert result.model.cfg.n_heads == 1 and result.model.cfg.ffn == 8
    assert result.sparsity is not None and result.sparsity.reached == pytest.approx(0.5, abs=1e-3)
    metrics = evaluate_model(result.model, split, "valid")
    assert 0.0 <= metrics["ndcg@10"] <= 1.0


@pytest.mark.parametrize("scope", ["global", "per_layer"])
def test_magnitude_pruning_reaches_the_target(scope: str) -> None:
    model = tiny()
    sparse, report = magnitude_prune(model, 0.7, scope)
    assert report.reached == pytest.approx(0.7, abs=1e-3)
    if scope == "per_layer":
        assert all(t.sparsity == pytest.approx(0.7, abs=0.01) for t in report.tensors)
    names = {t.name for t in report.tensors}
    assert "blocks.0.ffn.0.weight" in names and "item_emb.weight" not in names
    # the zeroed weights are the smallest ones
    zeroed = torch.cat(
        [w.flatten()[s.flatten() == 0] for w, s in zip(*weights(model, sparse), strict=True)]
    )
    kept = torch.cat(
        [w.flatten()[s.flatten() != 0] for w, s in zip(*weights(model, sparse), strict=True)]
    )
    if scope == "global":
        assert zeroed.abs().max() <= kept.abs().min()
    assert torch.equal(sparse.item_emb.weight, model.item_emb.weight)
    assert torch.equal(sparse.blocks[0].ffn[0].bias, model.blocks[0].ffn[0].bias)
    assert not (model.blocks[0].ffn[0].weight == 0).any()  # the input model is untouched
    # 70% zeros: CSR (fp32 values + int32 indices) is smaller than dense, same shapes
    assert report.model_sparse_bytes < report.model_dense_bytes
    assert sparse.blocks[0].ffn[0].weight.shape == model.blocks[0].ffn[0].weight.shape


def weights(a: SASRec, b: SASRec) -> tuple[list, list]:
    pick = [k for k, _ in a.named_parameters() if k.endswith("weight") and "ln" not in k]
    pick = [k for k in pick if "emb" not in k]
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return [pa[k] for k in pick], [pb[k] for k in pick]


def test_embedding_pruning_and_csr_size() -> None:
    model = tiny()
    sparse, report = magnitude_prune(model, 0.5, "per_layer", include_embedding=True)
    emb = next(t for t in report.tensors if t.name == "item_emb.weight")
    assert emb.sparsity == pytest.approx(0.5, abs=0.01)
    w = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 3.0]])
    assert csr_bytes(w) == 3 * 4 + 3 * 4 + 3 * 4  # values, column indices, 2 + 1 row pointers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        csr = sparse.blocks[0].ffn[0].weight.detach().to_sparse_csr()
    n_idx = csr.col_indices().numel() + csr.crow_indices().numel()
    torch_bytes = csr.values().numel() * 4 + n_idx * 4
    assert csr_bytes(sparse.blocks[0].ffn[0].weight) == torch_bytes
    with pytest.raises(ValueError):
        magnitude_prune(model, 1.0)
