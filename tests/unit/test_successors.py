"""Successor lists: built from the data, scored as documented, trained, exported, quantized."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from compression.configs import ModelConfig
from compression.data.sequences import Split, leave_one_out, pad_left
from compression.data.synthetic import SyntheticConfig, synthetic_dataset
from compression.export.exporter import export_onnx
from compression.model.sasrec import SASRec
from compression.model.successors import top_successors
from compression.quantize.fp16 import convert_fp16
from compression.quantize.int8 import quantize_dynamic_int8
from compression.quantize.item_matrix import quantize_item_matrix
from tests.conftest import quick_train

N_ITEMS = 40


def test_top_successors_counts_direct_followers_with_ties_to_the_lower_id() -> None:
    seqs = [np.array([1, 2, 1, 3]), np.array([1, 3, 4]), np.array([1, 5, 2, 4]), np.array([6])]
    table = top_successors(seqs, n_items=6, k=2)
    assert table.shape == (7, 2) and table.dtype == np.int64
    assert table[1].tolist() == [3, 2]  # 1 -> 3 twice; 1 -> 2 and 1 -> 5 once: lower id
    assert table[2].tolist() == [1, 4]
    assert table[3].tolist() == [4, 0]  # one distinct follower: the rest is padding
    assert table[6].tolist() == [0, 0] and table[0].tolist() == [0, 0]
    with pytest.raises(ValueError, match="n_items=3"):
        top_successors(seqs, n_items=3, k=2)


def crafted_model(**kw: object) -> SASRec:
    torch.manual_seed(0)
    cfg = ModelConfig(n_items=8, max_len=6, hidden=8, successors=2, successor_lags=2, **kw)  # type: ignore[arg-type]
    model = SASRec(cfg).eval()
    model.successors.succ[3] = torch.tensor([5, 6])
    model.successors.succ[4] = torch.tensor([5, 0])
    with torch.no_grad():
        model.successors.weight.copy_(torch.tensor([[1.0, 0.5], [0.25, 0.125]]))
    return model


def test_scores_gain_each_recent_items_successor_weights() -> None:
    model = crafted_model()
    seq = torch.tensor([[0, 1, 2, 3, 4]])  # most recent: 4 (lag 0), then 3 (lag 1)
    with_lists = model(seq)
    with torch.no_grad():
        model.successors.weight.zero_()
    dense = model(seq)
    gain = (with_lists - dense)[0]
    expected = torch.zeros(9)
    expected[5] = 1.0 + 0.25  # slot 0 of item 4 (lag 0) and of item 3 (lag 1): they add up
    expected[6] = 0.125  # slot 1 of item 3 at lag 1; item 4's empty slot adds nothing
    torch.testing.assert_close(gain, expected)


def test_training_entries_at_a_position_equal_inference_on_that_prefix() -> None:
    """The loss sees at position t exactly what serving adds after t items."""
    model = crafted_model()
    seq = torch.tensor([[0, 3, 4, 3, 1], [0, 0, 0, 4, 3]])
    ids, values = model.successor_entries(seq)
    dense = torch.zeros(2, 9)
    for t in range(seq.shape[1]):
        served = model.successors.add_to(dense, seq[:, : t + 1])
        trained = dense[:, 1:].scatter_add(1, (ids[:, t] - 1).clamp(min=0), values[:, t])
        torch.testing.assert_close(served[:, 1:], trained)


def test_ids_count_as_parameters() -> None:
    plain = SASRec(ModelConfig(n_items=8, max_len=6, hidden=8))
    model = crafted_model()
    # (n_items + 1) x k ids plus lags x k weights
    assert model.num_parameters() - plain.num_parameters() == 9 * 2 + 2 * 2


@pytest.fixture(scope="module")
def trained() -> tuple[SASRec, Split]:
    data = synthetic_dataset(SyntheticConfig(users=300, items=N_ITEMS, min_len=5, max_len=20))
    split = leave_one_out(data)
    cfg = ModelConfig(n_items=N_ITEMS, max_len=12, hidden=16, emb_dim=8, successors=3)
    return quick_train(cfg, split, epochs=2), split


def test_training_fits_the_lists_and_learns_their_weights(trained: tuple[SASRec, Split]) -> None:
    model, split = trained
    expected = top_successors(split.train, N_ITEMS, 3)
    assert np.array_equal(model.successors.succ.numpy(), expected)
    assert model.successors.weight.abs().min() > 0  # moved from their zero start


def test_a_given_start_model_without_lists_gets_them_fitted(trained: tuple[SASRec, Split]) -> None:
    """E.g. a coded student built from the teacher before training."""
    model, split = trained
    fresh = SASRec(model.cfg)
    assert not fresh.successors.succ.any()
    again = quick_train(model.cfg, split, epochs=1, init_model=fresh)
    assert np.array_equal(again.successors.succ.numpy(), model.successors.succ.numpy())


@pytest.mark.parametrize("variant", ["fp32", "item-matrix+dynamic", "fp16"])
def test_exported_variants_keep_the_successor_scores(
    trained: tuple[SASRec, Split], tmp_path: Path, variant: str
) -> None:
    model = copy.deepcopy(trained[0])
    with torch.no_grad():  # large, distinct weights: their effect stands out of int8 noise
        model.successors.weight.copy_(torch.linspace(3.0, 0.5, 9).reshape(3, 3))
    src = tmp_path / "model.onnx"
    export_onnx(model, src)  # checks parity with PyTorch
    dst = tmp_path / f"{variant}.onnx"
    if variant == "fp16":
        convert_fp16(src, dst)
    elif variant == "item-matrix+dynamic":
        mid = tmp_path / "item.onnx"
        report = quantize_item_matrix(src, mid)
        assert report.output_quantized  # found the product behind the successor scatter
        quantize_dynamic_int8(mid, dst)
    else:
        dst = src
    assert "ScatterElements" in [n.op_type for n in onnx.load(str(dst)).graph.node]

    hist, _ = trained[1].eval_inputs("valid")
    batch = pad_left(hist[:32], 12)
    with torch.no_grad():
        full = model(torch.from_numpy(batch)).numpy()
        model.successors.weight.zero_()
        dense = model(torch.from_numpy(batch)).numpy()
    session = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    served = session.run(["scores"], {"item_ids": batch})[0]
    np.testing.assert_allclose(served, full, atol=0.1)
    assert np.abs(full - dense).max() >= 3.0  # the lists' gains are in what is served
