"""Product-quantized item embeddings: lookup, fitting, counting, settings, checkpoint, export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from pydantic import ValidationError

from compression.coded_embedding import CodedEmbedding
from compression.configs import ModelConfig, TeacherRecipe
from compression.export import export_onnx, top_k_agreement
from compression.model import SASRec
from compression.train import load_checkpoint, save_checkpoint
from tests.conftest import export_with_parity, ort_optimized_graph

CODED = {"emb_codebooks": 4, "emb_centroids": 8}


def fitted_model() -> SASRec:
    """A small coded model in eval mode, its codes fitted to a random source matrix."""
    torch.manual_seed(0)
    model = SASRec(ModelConfig(n_items=60, max_len=12, hidden=16, n_heads=2, **CODED)).eval()
    model.item_emb.fit(np.random.default_rng(1).standard_normal((61, 16)))
    return model


def test_an_item_vector_is_its_codebook_rows_side_by_side() -> None:
    torch.manual_seed(0)
    emb = CodedEmbedding(n_items=50, n_codebooks=4, n_centroids=8, width=16)
    weight = emb.weight.detach()
    assert weight.shape == (51, 16) and not weight[0].any()  # padding row is zero
    for item in (1, 17, 50):
        expected = torch.cat([emb.codebooks[m, emb.codes[item, m] - 1] for m in range(4)])
        assert torch.equal(weight[item], expected.detach())
    ids = torch.tensor([[0, 3, 50]])
    assert torch.equal(emb(ids)[0], weight[ids[0]])
    emb(ids).sum().backward()  # codebooks learn; the codes are a fixed buffer
    assert emb.codebooks.grad is not None and emb.codebooks.grad.abs().sum() > 0
    assert [name for name, _ in emb.named_parameters()] == ["codebooks"]


def test_fit_recovers_codes_of_a_matrix_that_is_exactly_coded() -> None:
    rng = np.random.default_rng(0)
    books = rng.standard_normal((2, 8, 6))  # 2 sub-spaces of 6 dims, 8 centroids each
    codes = rng.integers(0, 8, size=(120, 2))
    source = np.zeros((121, 12))
    source[1:] = np.concatenate([books[0][codes[:, 0]], books[1][codes[:, 1]]], axis=1)
    emb = CodedEmbedding(n_items=120, n_codebooks=2, n_centroids=8, width=12)
    # A rotation mixes the sub-spaces, so exactness is not expected; the quality is.
    fit = emb.fit(source, seed=0)
    assert fit["reconstruction_r2"] > 0.7
    # Items with one source vector get one code row; distinct vectors mostly stay apart.
    same = np.flatnonzero((codes == codes[0]).all(axis=1)) + 1
    assert all(torch.equal(emb.codes[i], emb.codes[same[0]]) for i in same)
    assert not emb.codes[0].any() and (emb.codes[1:] >= 1).all() and (emb.codes <= 8).all()
    # Codebooks start at the centroids: the fitted table reproduces the (rotated) source.
    width_kept = CodedEmbedding(n_items=120, n_codebooks=1, n_centroids=120, width=12)
    assert width_kept.fit(source)["reconstruction_r2"] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match=r"expected \(121, width\)"):
        emb.fit(source[1:])


def test_codes_count_as_parameters() -> None:
    cfg = ModelConfig(n_items=60, max_len=8, hidden=16, n_heads=2, **CODED)
    model = SASRec(cfg)
    trained = sum(p.numel() for p in model.parameters())
    assert model.item_emb.codebooks.numel() == 4 * 8 * 4
    assert model.num_parameters() == trained + 60 * 4
    plain = SASRec(ModelConfig(n_items=60, max_len=8, hidden=16, n_heads=2))
    assert trained == plain.num_parameters() - 61 * 16 + 4 * 8 * 4


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"emb_codebooks": 3}, "does not divide the item vector width 16"),
        ({"emb_codebooks": 4, "emb_dim": 6}, "width 6"),
        ({**CODED, "tied": False}, "need tied"),
        ({**CODED, "emb_cutoffs": (10,), "emb_dims": (16, 8)}, "exclude emb_cutoffs"),
        ({"emb_codebooks": 4, "emb_centroids": 61}, "emb_centroids=61 exceeds the catalogue"),
        ({"emb_codebooks": 4, "emb_centroids": 1}, "greater than or equal to 2"),
    ],
)
def test_bad_coded_settings_name_the_problem(kw: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ModelConfig(n_items=60, max_len=8, hidden=16, **kw)


def test_a_recipe_with_more_centroids_than_items_names_the_key() -> None:
    recipe = TeacherRecipe(name="t", model={"hidden": 16, **CODED})
    assert recipe.model_config_for(100).emb_codebooks == 4
    with pytest.raises(ValueError, match=r"^model: .*emb_centroids=8 exceeds the catalogue"):
        recipe.model_config_for(5)


def test_checkpoint_carries_the_codes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SASRec(ModelConfig(n_items=60, max_len=8, hidden=16, n_heads=2, **CODED))
    model.item_emb.fit(np.random.default_rng(2).standard_normal((61, 24)))
    save_checkpoint(tmp_path / "model.safetensors", model)
    loaded = load_checkpoint(tmp_path / "model.safetensors")
    assert torch.equal(loaded.item_emb.codes, model.item_emb.codes)
    seq = torch.tensor([[0, 4, 9, 33]])
    torch.testing.assert_close(loaded(seq), model.eval()(seq))


def test_export_keeps_codes_and_codebooks_and_matches_pytorch(tmp_path: Path) -> None:
    model = fitted_model()
    path = tmp_path / "model.onnx"
    export_with_parity(model, path)
    dims = {i.name: list(i.dims) for i in onnx.load(str(path)).graph.initializer}
    assert dims["item_emb.codes"] == [61, 4] and dims["item_emb.table"] == [4 * 9, 4]
    assert [61, 16] not in dims.values()  # no dense item matrix in the file
    # ...but ONNX Runtime folds one when the session starts: nothing per request.
    optimized = ort_optimized_graph(path, tmp_path)
    assert not any("item_emb.codes" in n.input for n in optimized.node)
    assert any(list(i.dims) == [61, 16] for i in optimized.initializer)


def test_int8_and_fp16_variants_of_a_coded_model_keep_its_ranking(tmp_path: Path) -> None:
    from compression.fp16 import convert_fp16
    from compression.item_matrix import quantize_item_matrix
    from compression.onnx_files import QuantizeError
    from compression.quantize import quantize_dynamic_int8

    model = fitted_model()
    src = tmp_path / "model.onnx"
    export_onnx(model, src)
    batch = np.random.default_rng(3).integers(1, 61, size=(16, 12))
    with torch.inference_mode():
        want = model(torch.from_numpy(batch)).numpy()
    for name, make in [("int8", quantize_dynamic_int8), ("fp16", convert_fp16)]:
        dst = tmp_path / f"{name}.onnx"
        make(src, dst)
        session = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
        got = session.run(["scores"], {"item_ids": batch})[0]
        assert top_k_agreement(got, want, k=5) > 0.8, name
    # The int8 item-matrix format needs a stored matrix: refused with a reason, no file.
    with pytest.raises(QuantizeError, match="coded item embeddings"):
        quantize_item_matrix(src, tmp_path / "rows.onnx")
    assert not (tmp_path / "rows.onnx").exists()
