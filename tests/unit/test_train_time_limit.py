"""A time limit ends a run on a validated epoch; every epoch is validated."""

from __future__ import annotations

from compression.configs import ModelConfig, TrainConfig
from compression.data.sequences import leave_one_out
from compression.data.synthetic import SyntheticConfig, synthetic_dataset
from compression.model.train import train
from compression.pipeline import prefixed


def tiny_run(**train_kw: object):
    data = synthetic_dataset(SyntheticConfig(users=60, items=30, max_len=10, min_len=4))
    cfg = ModelConfig(n_items=data.n_items, max_len=10, hidden=8)
    return train(
        cfg,
        TrainConfig(lr=1e-2, seed=0, **train_kw),  # type: ignore[arg-type]
        leave_one_out(data),
        progress=False,
        log=lambda _: None,
    )


def test_time_limit_before_the_first_validation_validates_the_last_epoch() -> None:
    # An unvalidated last epoch once left best_valid {} and publishing failed with
    # KeyError: 'hr@10'.
    result = tiny_run(max_epochs=10, time_limit_s=1e-6)
    assert result.stopped_by == "time_limit" and result.epochs_run == 1
    assert result.best_epoch == 1
    assert 0.0 <= result.best_valid["ndcg@10"] <= 1.0
    assert "valid_ndcg@10" in result.history[-1]
    assert prefixed("valid", result.best_valid)["valid_hr@10"] >= 0.0  # what publish reads


def test_every_epoch_is_validated() -> None:
    result = tiny_run(max_epochs=3)
    assert [("valid_ndcg@10" in r) for r in result.history] == [True, True, True]
