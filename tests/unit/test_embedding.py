"""Mixed-dimension item embeddings: bucket assignment, parameter count, training, export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from pydantic import ValidationError

from compression.configs import ModelConfig, TrainConfig
from compression.data import leave_one_out
from compression.embedding import MixedDimEmbedding
from compression.evaluate import evaluate_model, evaluate_popularity
from compression.model import SASRec
from compression.synthetic import SyntheticConfig, synthetic_dataset
from compression.train import load_checkpoint, save_checkpoint, train
from tests.conftest import export_with_parity, ort_optimized_graph

MIXED = {"emb_cutoffs": (10, 30), "emb_dims": (16, 8, 4)}


def test_popular_items_get_the_wide_vectors() -> None:
    torch.manual_seed(0)
    emb = MixedDimEmbedding(n_items=60, cutoffs=(10, 30), dims=(16, 8, 4), out_dim=16)
    counts = np.random.default_rng(0).permutation(61) * 3
    counts[0] = 0
    emb.set_popularity(counts)
    by_popularity = np.argsort(-counts[1:], kind="stable") + 1
    weight = emb.weight.detach()
    assert not weight[0].any()  # padding
    for rank, item in enumerate(by_popularity):
        bucket = 0 if rank < 10 else 1 if rank < 30 else 2
        row = rank - (0, 10, 30)[bucket]
        expected = emb.tables[bucket][row] @ emb.projs[bucket]
        assert torch.allclose(weight[item], expected.detach())
    ids = torch.tensor([[0, int(by_popularity[0]), int(by_popularity[-1])]])
    assert torch.equal(emb(ids)[0], weight[ids[0]])


def test_parameters_follow_the_bucket_widths() -> None:
    emb = MixedDimEmbedding(n_items=60, cutoffs=(10, 30), dims=(16, 8, 4), out_dim=16)
    expected = 10 * 16 + 20 * 8 + 30 * 4 + (16 + 8 + 4) * 16
    assert sum(p.numel() for p in emb.parameters()) == expected
    with pytest.raises(ValueError, match="one per item id"):
        emb.set_popularity(np.ones(60))


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"emb_cutoffs": (10,)}, "give both"),
        ({"emb_cutoffs": (10, 30), "emb_dims": (16, 8)}, "give both"),
        ({"emb_cutoffs": (30, 10), "emb_dims": (16, 8, 4)}, "rise strictly"),
        ({"emb_cutoffs": (10, 60), "emb_dims": (16, 8, 4)}, "n_items=60"),
        ({**MIXED, "emb_dim": 8}, "replace emb_dim"),
        ({**MIXED, "tied": False}, "tied"),
    ],
)
def test_bad_mixed_dimension_settings_name_the_problem(kw: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ModelConfig(n_items=60, max_len=8, hidden=16, **kw)


def test_training_assigns_buckets_by_popularity_and_learns(tmp_path: Path) -> None:
    data = synthetic_dataset(SyntheticConfig(users=800, items=120, max_len=25, seed=1))
    split = leave_one_out(data)
    cfg = ModelConfig(
        n_items=data.n_items, max_len=25, hidden=32, n_heads=2, dropout=0.1,
        emb_cutoffs=(20, 60), emb_dims=(32, 8, 4),
    )  # fmt: skip
    result = train(
        cfg, TrainConfig(max_epochs=12, lr=5e-3, patience=3, seed=0), split,
        progress=False, log=lambda _: None,
    )  # fmt: skip
    model = result.model
    counts = split.item_counts()
    most_popular = int(np.argmax(counts[1:]) + 1)
    assert int(model.item_emb.rows[most_popular]) == 1
    assert (
        evaluate_model(model, split, "test")["ndcg@10"]
        > 2 * evaluate_popularity(split, "test")["ndcg@10"]
    )
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, model)
    loaded = load_checkpoint(path)  # the assignment travels with the checkpoint
    assert torch.equal(loaded.item_emb.rows, model.item_emb.rows)
    seq = torch.tensor([[0, 0, 3, 7, 11]])
    assert torch.allclose(loaded(seq), model.eval()(seq))


def test_export_parity_with_a_popularity_order(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SASRec(ModelConfig(n_items=60, max_len=12, hidden=16, n_heads=2, **MIXED)).eval()
    model.item_emb.set_popularity(np.random.default_rng(1).integers(0, 100, 61))
    path = tmp_path / "model.onnx"
    export_with_parity(model, path)
    # The file keeps the small factors; ONNX Runtime folds them into one matrix when the
    # session starts, so serving computes nothing per request for the factorization.
    names = {i.name for i in onnx.load(str(path)).graph.initializer}
    assert "item_emb.tables.0" in names
    optimized = ort_optimized_graph(path, tmp_path)
    assert not any(n.input[0].startswith("item_emb.tables") for n in optimized.node)
    assert any(list(i.dims) == [61, 16] for i in optimized.initializer)


def test_a_recipe_whose_cutoffs_exceed_the_catalogue_names_the_key() -> None:
    from compression.configs import TeacherRecipe

    recipe = TeacherRecipe(
        name="t", model={"hidden": 8, "emb_cutoffs": [10, 40], "emb_dims": [8, 4, 2]}
    )
    assert recipe.model_config_for(100).emb_cutoffs == (10, 40)
    with pytest.raises(ValueError, match=r"^model: emb_cutoffs=\[10, 40\].*n_items=20"):
        recipe.model_config_for(20)
