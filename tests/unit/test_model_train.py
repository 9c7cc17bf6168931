"""Model semantics, the chunked loss, checkpoints, and learning on synthetic data."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from compression.configs import ModelConfig, TrainConfig
from compression.data.sequences import leave_one_out
from compression.data.synthetic import SyntheticConfig, synthetic_dataset
from compression.evaluate.metrics import evaluate_model, evaluate_popularity
from compression.model.losses import full_softmax_ce
from compression.model.sasrec import FastDropout, SASRec
from compression.model.train import (
    batches_per_epoch,
    length_bucketed_batches,
    load_checkpoint,
    save_checkpoint,
    train,
    training_pairs,
    weight_average,
)


def small_model(**kw: object) -> SASRec:
    torch.manual_seed(0)
    cfg = ModelConfig(n_items=50, max_len=12, hidden=16, n_heads=2, **kw)  # type: ignore[arg-type]
    return SASRec(cfg).eval()


def test_scores_do_not_depend_on_padding() -> None:
    model = small_model()
    seq = torch.tensor([[5, 9, 2, 7]])
    padded = torch.tensor([[0, 0, 0, 5, 9, 2, 7]])
    with torch.no_grad():
        assert torch.allclose(model(seq), model(padded), atol=1e-5)
        assert model(seq).shape == (1, 51)


def test_attention_is_causal_and_window_truncates() -> None:
    model = small_model()
    a = torch.tensor([[3, 4, 5, 6, 7]])
    b = torch.tensor([[3, 4, 5, 6, 40]])  # only the last item differs
    with torch.no_grad():
        ha, hb = model.encode(a), model.encode(b)
        long = torch.randint(1, 51, (2, 30))
        truncated_equal = torch.allclose(model(long), model(long[:, -12:]), atol=1e-5)
    assert torch.allclose(ha[:, :4], hb[:, :4], atol=1e-6)  # earlier positions never see it
    assert not torch.allclose(ha[:, 4], hb[:, 4])
    assert truncated_equal  # only the most recent max_len items count


def test_chunked_loss_equals_full_cross_entropy() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(300, 8, requires_grad=True)
    weight = torch.randn(40, 8, requires_grad=True)
    targets = torch.randint(0, 40, (300,))
    loss = full_softmax_ce(hidden, weight, targets, chunk_rows=64)
    loss.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    reference = F.cross_entropy(hidden @ weight.T, targets)
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert torch.allclose(grads[0], hidden.grad, atol=1e-6)
    assert torch.allclose(grads[1], weight.grad, atol=1e-6)


def test_fast_dropout_rate_and_scale() -> None:
    drop = FastDropout(0.25)
    x = torch.ones(200_000)
    drop.train()
    y = drop(x)
    assert (y == 0).float().mean().item() == pytest.approx(0.25, abs=0.01)
    assert y.mean().item() == pytest.approx(1.0, abs=0.02)
    drop.eval()
    assert torch.equal(drop(x), x)


def test_length_buckets_cover_every_example_once() -> None:
    lengths = np.random.default_rng(0).integers(1, 100, size=1000)
    batches = list(length_bucketed_batches(lengths, 32, np.random.default_rng(1), 5))
    seen = np.concatenate(batches)
    assert sorted(seen.tolist()) == list(range(1000))
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    assert spread < 0.5 * np.ptp(lengths)  # batches hold similar lengths


def test_config_validation() -> None:
    with pytest.raises(ValidationError, match="not divisible"):
        ModelConfig(n_items=10, hidden=30, n_heads=4)
    with pytest.raises(ValidationError, match="Extra inputs"):
        ModelConfig(n_items=10, hiden=32)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        TrainConfig(lr=0)
    with pytest.raises(ValidationError, match="device"):
        TrainConfig(device="tpu")


def tiny_split():
    data = synthetic_dataset(SyntheticConfig(users=60, items=30, max_len=10, min_len=4))
    return data, leave_one_out(data)


def test_cuda_requested_without_gpu_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    data, split = tiny_split()
    cfg = ModelConfig(n_items=data.n_items, max_len=10, hidden=8)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        train(cfg, TrainConfig(max_epochs=1, device="cuda"), split, progress=False)


@pytest.mark.gpu
def test_training_on_gpu_matches_cpu_quality_shape() -> None:
    data, split = tiny_split()
    cfg = ModelConfig(n_items=data.n_items, max_len=10, hidden=8)
    result = train(
        cfg, TrainConfig(max_epochs=2, device="cuda"), split, progress=False, log=lambda _: None
    )
    assert next(result.model.parameters()).device.type == "cpu"
    assert np.isfinite(result.history[-1]["loss"])


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_checkpoint_round_trip_and_refusals(tmp_path: Path) -> None:
    model = small_model(emb_dim=6)
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, model)
    loaded = load_checkpoint(path)
    assert loaded.cfg == model.cfg
    seq = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(seq), model(seq))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a usable model checkpoint"):
        load_checkpoint(path)

    class Evil:
        def __reduce__(self):  # would run code if unpickled without weights_only
            return (Path.touch, (tmp_path / "pwned",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"format": "recsys-sasrec/1", "x": Evil()}))
    with pytest.raises(ValueError):
        load_checkpoint(evil)
    assert not (tmp_path / "pwned").exists()


def test_training_learns_sequential_structure() -> None:
    data = synthetic_dataset(SyntheticConfig(users=800, items=120, max_len=25, seed=1))
    split = leave_one_out(data)
    cfg = ModelConfig(n_items=data.n_items, max_len=25, hidden=32, n_heads=2, dropout=0.1)
    result = train(
        cfg,
        TrainConfig(max_epochs=12, lr=5e-3, patience=3, seed=0),
        split,
        progress=False,
        log=lambda _: None,
    )
    model_ndcg = evaluate_model(result.model, split, "test")["ndcg@10"]
    popularity_ndcg = evaluate_popularity(split, "test")["ndcg@10"]
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert model_ndcg > 2 * popularity_ndcg, (model_ndcg, popularity_ndcg)


def test_lr_decays_on_plateau_from_the_best_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    import compression.model.train as train_module

    scripted = iter([0.10, 0.20, 0.15, 0.14, 0.25, 0.11, 0.12, 0.13, 0.09])
    monkeypatch.setattr(
        train_module, "evaluate_model", lambda *a, **k: {"ndcg@10": next(scripted), "users": 1}
    )
    data, split = tiny_split()
    cfg = ModelConfig(n_items=data.n_items, max_len=10, hidden=8)
    logs: list[str] = []
    result = train(
        cfg,
        TrainConfig(
            max_epochs=9,
            lr=1e-2,
            patience=3,
            lr_decay_patience=2,
            max_lr_decays=1,
        ),
        split,
        progress=False,
        log=logs.append,
    )
    decays = [line for line in logs if "validation stalled" in line]
    assert decays == ["validation stalled: back to epoch 2, lr -> 3.00e-03"]  # x 0.3
    assert result.best_epoch == 5
    assert result.stopped_by == "early_stopping" and result.epochs_run == 8


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"emb_dim": 6},
        {"successors": 2},
    ],
)
def test_inference_path_equals_full_encoding(kw: dict) -> None:
    model = small_model(n_blocks=3, **kw)
    seq = torch.tensor([[0, 0, 4, 9, 2, 7], [1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        full = model.query(model.encode(seq)[:, -1]) @ model.output_weight.T
        assert torch.allclose(model(seq), full, atol=1e-5)


def test_all_windows_make_every_training_step_a_target_once() -> None:
    seqs = [np.arange(1, 12), np.array([5, 6]), np.array([9])]
    inputs, targets = training_pairs(seqs, 4)
    assert [t.tolist() for t in targets] == [[8, 9, 10, 11], [6]]  # last window per user
    inputs, targets = training_pairs(seqs, 4, all_windows=True)
    assert [t.tolist() for t in targets] == [[8, 9, 10, 11], [4, 5, 6, 7], [2, 3], [6]]
    assert [x.tolist() for x in inputs] == [[7, 8, 9, 10], [3, 4, 5, 6], [1, 2], [5]]
    assert all(len(x) <= 4 for x in inputs)


def test_strided_windows_put_every_step_in_the_last_stride_positions_once() -> None:
    # A model reading the last 3 positions of 6-step inputs (a short student, a long teacher).
    seqs = [np.arange(1, 12), np.array([5, 6])]
    inputs, targets = training_pairs(seqs, 6, all_windows=True, stride=3)
    assert [x.tolist() for x in inputs] == [
        [5, 6, 7, 8, 9, 10], [2, 3, 4, 5, 6, 7], [1, 2, 3, 4], [1], [5]
    ]  # fmt: skip
    trained = [t for ts in targets for t in ts[-3:].tolist()]
    assert sorted(trained) == sorted([*range(2, 12), 6])  # every target once, per user
    with pytest.raises(ValueError, match="stride"):
        training_pairs(seqs, 6, all_windows=True, stride=7)


def test_batches_per_epoch_counts_what_the_batcher_yields() -> None:
    for n, size, chunk in [(1000, 32, 5), (1, 128, 50), (6400, 128, 50), (6401, 128, 50)]:
        lengths = np.ones(n, dtype=int)
        yielded = list(length_bucketed_batches(lengths, size, np.random.default_rng(0), chunk))
        assert batches_per_epoch(n, size, chunk) == len(yielded)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_autocast_only_where_the_cpu_has_native_bf16(
    monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    # Emulated bf16 made an ML-1M teacher epoch 20x slower on an AVX2-only CPU.
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    seen: list[bool] = []
    real_autocast = torch.autocast

    def spy(device_type: str, dtype: torch.dtype, enabled: bool = True) -> torch.autocast:
        seen.append(enabled)
        return real_autocast(device_type, dtype=dtype, enabled=False)  # fast either way

    monkeypatch.setattr(torch, "autocast", spy)
    data, split = tiny_split()
    logs: list[str] = []
    cfg = ModelConfig(n_items=data.n_items, max_len=10, hidden=8, n_blocks=1)
    train(cfg, TrainConfig(max_epochs=1), split, progress=False, log=logs.append)
    assert seen and all(e is native for e in seen)
    assert any("bf16 autocast off" in line for line in logs) is not native


def test_weight_average_spans_the_given_epochs() -> None:
    model = small_model(n_blocks=1)
    # 40 pairs in batches of 8: 5 steps an epoch; 2 epochs -> decay 1 - 1/10.
    ema = weight_average(model, 2.0, n_pairs=40, batch_size=8)
    assert ema is not None and weight_average(model, None, 40, 8) is None
    param = model.pos_emb.weight
    expected = None
    for value in (1.0, 3.0, -2.0):
        with torch.no_grad():
            param.fill_(value)
        ema.update_parameters(model)
        expected = value if expected is None else 0.9 * expected + 0.1 * value
        assert torch.allclose(ema.module.pos_emb.weight, torch.full_like(param, expected))


def _trained(ema_epochs: float | None) -> dict[str, torch.Tensor]:
    data, split = tiny_split()
    cfg = ModelConfig(n_items=data.n_items, max_len=10, hidden=8, n_blocks=1, dropout=0.0)
    train_cfg = TrainConfig(max_epochs=3, lr=1e-2, batch_size=8, patience=10, ema_epochs=ema_epochs)
    result = train(cfg, train_cfg, split, progress=False, log=lambda _: None)
    assert result.best_valid == evaluate_model(result.model, split, "valid")
    return result.model.state_dict()


def test_training_keeps_and_returns_the_weight_average() -> None:
    plain = _trained(None)
    # An average over a vanishing span is the last weights: training is unchanged.
    same = _trained(1e-9)
    assert all(torch.equal(plain[k], same[k]) for k in plain)
    # An average over a very long span stays at the first step's weights: it lags far
    # behind the trained ones, closer to the initial weights.
    torch.manual_seed(0)
    data, _ = tiny_split()
    init = SASRec(ModelConfig(n_items=data.n_items, max_len=10, hidden=8, n_blocks=1)).state_dict()
    lagging = _trained(1e9)
    key = "item_emb.weight"
    assert torch.dist(lagging[key], init[key]) < 0.5 * torch.dist(plain[key], init[key])


def test_stored_configs_with_retired_options_load_only_at_their_neutral_value(
    tmp_path: Path,
) -> None:
    cfg = ModelConfig(n_items=50, max_len=12, hidden=16, n_heads=2)
    old = {**cfg.model_dump(), "tied": True, "emb_codebooks": None, "item_tower": None}
    assert ModelConfig.from_stored(old) == cfg
    with pytest.raises(ValueError, match="item_tower=12, an option retired"):
        ModelConfig.from_stored({**old, "item_tower": 12})
    with pytest.raises(ValidationError, match="no_such"):  # unknown keys stay refused
        ModelConfig.from_stored({**old, "no_such": 1})
