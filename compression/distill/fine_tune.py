"""Distil a model into a modified copy of itself: the fine-tune after pruning, and
quantization-aware training (the fp32 model teaches its fake-quantized copy)."""

from __future__ import annotations

from collections.abc import Callable

from compression.configs import DistillConfig, TrainConfig
from compression.data.sequences import Split
from compression.model.sasrec import SASRec
from compression.model.train import TrainResult, train


def fine_tune(
    model: SASRec,
    teacher: SASRec,
    split: Split,
    train_cfg: TrainConfig,
    distill_cfg: DistillConfig,
    epochs: int | None = None,
    teacher_valid_ndcg: float | None = None,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Distil `teacher` (e.g. the unpruned model) into a copy of `model`; best validation epoch.

    `epochs` overrides `train_cfg.max_epochs`. The `plateau` strategy needs the teacher's
    validation NDCG@10: given, or measured here. Note that `train` keeps the best *trained*
    epoch, so the result can score below `model` if fine-tuning only hurts.
    """
    from compression.distill.loss import DistillLoss
    from compression.evaluate.metrics import evaluate_model

    if epochs is not None:
        train_cfg = TrainConfig(**{**train_cfg.model_dump(), "max_epochs": epochs})
    if teacher_valid_ndcg is None:
        teacher_valid_ndcg = 0.0
        if distill_cfg.strategy == "plateau":
            valid = evaluate_model(teacher, split, "valid")
            teacher_valid_ndcg = valid["ndcg@10"]
    loss = DistillLoss(distill_cfg, teacher, teacher_valid_ndcg)
    return train(
        model.cfg,
        train_cfg,
        split,
        loss_fn=loss,
        progress=progress,
        log=log,
        on_eval=loss.on_eval,
        input_len=max(teacher.cfg.max_len, model.cfg.max_len),
        init_model=model,
    )
