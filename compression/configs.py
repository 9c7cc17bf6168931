"""Validated configuration classes: unknown keys and impossible values are refused."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"


# Distillation settings that became constants (compression.distill.loss.PLATEAU_STEP and
# PLATEAU_FLOOR), with their values: a stored recipe holding them still reads as today's
# where they had no effect (another strategy) or the constant's value.
RETIRED_DISTILL_SETTINGS: dict[str, float] = {"alpha_step": 0.25, "min_teacher_weight": 0.25}


def without_retired(recipe: Mapping[str, Any]) -> dict[str, Any] | None:
    """`recipe` (a stored dump) without retired distillation settings; None when one of
    them shaped the run (the plateau strategy at another value)."""
    distill = recipe.get("distill")
    if not isinstance(distill, Mapping):
        return dict(recipe)
    kept = dict(distill)
    for key, value in RETIRED_DISTILL_SETTINGS.items():
        if key in kept and kept.pop(key) != value and kept.get("strategy") == "plateau":
            return None
    return {**recipe, "distill": kept}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Model options that measured neutral or worse (docs/distillation.md) and were removed, with
# the value that means "not used": older checkpoints still load when they hold it.
RETIRED_MODEL_OPTIONS: dict[str, object] = {
    "tied": True,
    "positions": "from_start",
    "shared_blocks": False,
    "emb_cutoffs": None,
    "emb_dims": None,
    "emb_codebooks": None,
    "emb_centroids": 256,
    "item_tower": None,
}


class ModelConfig(_Strict):
    """SASRec-style causal Transformer; teacher and students differ only in these numbers."""

    n_items: int = Field(gt=0, description="catalogue size; internal ids 1..n_items, 0 = padding")
    max_len: int = Field(200, ge=1, le=4096, description="most recent items the model reads")
    hidden: int = Field(64, ge=4, le=4096, description="width of the Transformer")
    n_blocks: int = Field(2, ge=1, le=48, description="Transformer blocks")
    n_heads: int = Field(1, ge=1, le=64, description="attention heads per block")
    ffn: int | None = Field(None, ge=4, description="feed-forward width; None = hidden")
    dropout: float = Field(
        0.2, ge=0.0, lt=1.0, description="dropout on embeddings, residuals and FFN outputs"
    )
    emb_dim: int | None = Field(
        None,
        ge=2,
        description="item embedding size; None = hidden. Smaller values factorize "
        "the embedding/output matrix (the bulk of the parameters) through a projection",
    )
    successors: int | None = Field(
        None,
        ge=1,
        le=256,
        description="sparse successor lists: also score each of the last successor_lags "
        "items' this many most frequent next items (ids fixed from the training sequences, "
        "one trained weight per lag and slot; compression/model/successors.py). The ids count as "
        "parameters. None = dense scores only",
    )
    successor_lags: int = Field(
        3, ge=1, le=16, description="how many of the most recent items the successor lists read"
    )
    head_dim: int | None = Field(
        None,
        ge=1,
        description="width of one attention head; None = hidden // n_heads. Set by head "
        "pruning, where n_heads * head_dim (the attention's inner width) differs from hidden",
    )
    bidirectional: bool = Field(
        False,
        description="BERT4Rec-style: every position attends to the whole history, trained "
        "by cloze (masked items) and scored at a [mask] appended after the history",
    )

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> ModelConfig:
        if self.head_dim is None and self.hidden % self.n_heads:
            raise ValueError(f"hidden={self.hidden} is not divisible by n_heads={self.n_heads}")
        if self.bidirectional and self.successors:
            raise ValueError(
                "successors with bidirectional: successor lists score the items before a "
                "position, which a bidirectional model does not predict from; drop one"
            )
        if self.bidirectional and self.max_len < 2:
            raise ValueError("bidirectional needs max_len >= 2 (the history and its [mask])")
        return self

    @classmethod
    def from_stored(cls, stored: Mapping[str, Any]) -> ModelConfig:
        """The config a checkpoint or manifest recorded. Options retired since (their numbers
        are in docs/distillation.md) are dropped where they hold the one behaviour left, and
        refused, naming the option, where the model depends on them."""
        kept = dict(stored)
        for key, only in RETIRED_MODEL_OPTIONS.items():
            if key in kept and kept.pop(key) != only:
                raise ValueError(
                    f"the stored model uses {key}={stored[key]!r}, an option retired from the "
                    "model family (docs/distillation.md); retrain it with this version"
                )
        return cls(**kept)

    @property
    def ffn_width(self) -> int:
        return self.ffn or self.hidden

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.hidden // self.n_heads


class TrainConfig(_Strict):
    """One training run. Early stopping watches validation NDCG@10."""

    max_epochs: int = Field(200, ge=1, description="epoch budget (headline recipes use this)")
    batch_size: int = Field(128, ge=1, description="training sequences per step")
    lr: float = Field(1e-3, gt=0.0, description="Adam learning rate")
    patience: int = Field(10, ge=1, description="evaluations without improvement before stop")
    lr_decay_patience: int = Field(
        5,
        ge=1,
        description="evaluations without improvement before restoring the best "
        "weights and multiplying lr by 0.3",
    )
    max_lr_decays: int = Field(0, ge=0, description="0 = constant lr, plain early stopping")
    ema_epochs: float | None = Field(
        None,
        gt=0.0,
        description="validate, keep and publish an exponential moving average of the weights "
        "that spans about this many recent epochs (decay 1 - 1 / (ema_epochs x steps per "
        "epoch)) instead of the last step's weights; None = the weights as trained",
    )
    windows: Literal["last", "all"] = Field(
        "last",
        description="train on each user's last max_len steps, or on every max_len-step "
        "window of longer histories (more data from long histories, longer epochs)",
    )
    loss: Literal["full", "sampled-uniform", "sampled-popularity", "gbce"] = Field(
        "full",
        description="softmax over every item, or over `negatives` sampled items (log-Q "
        "corrected), or gSASRec's gBCE: a sampled loss's step cost ignores the catalogue",
    )
    negatives: int = Field(256, ge=1, description="items drawn per batch by a sampled loss")
    mask_prob: float = Field(
        0.2, gt=0.0, lt=1.0, description="bidirectional models: share of items masked (cloze)"
    )
    seed: int = Field(0, description="seeds weights, batches and dropout")
    time_limit_s: float | None = Field(None, gt=0.0, description="stop after this wall time")
    threads: int | None = Field(None, ge=1, description="torch threads; None = all cores")
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$", description="torch device")


class DistillConfig(_Strict):
    """Distillation loss and adaptive strategy; the rules are in `compression.distill.loss`."""

    alpha: float = Field(0.5, ge=0.0, le=1.0, description="KL weight; 1 - alpha goes to L2")
    temperature: float = Field(2.0, gt=0.0, description="softmax temperature T of the KL term")
    beta: float = Field(0.0, ge=0.0, description="hard-label cross-entropy weight")
    top_k: int | None = Field(None, ge=1, description="teacher top-K soft targets only")
    strategy: Literal["fixed", "reliability", "plateau"] = Field(
        "fixed", description="fixed weights, or an adaptive rule (compression.distill.loss)"
    )
    plateau_patience: int = Field(
        2, ge=1, description="plateau: stalled evaluations before weight moves to labels"
    )


class DataSpec(_Strict):
    """Where the interactions come from: a file path or `synthetic[:key=value,...]`."""

    path: str = Field("synthetic", description="data file, or synthetic[:key=value,...]")
    fmt: str | None = Field(None, description="event-log format; None = from the file name")
    user_col: str | None = Field(None, description="event log: user column (generic CSV/Parquet)")
    item_col: str | None = Field(None, description="event log: item column (generic CSV/Parquet)")
    time_col: str | None = Field(None, description="event log: time column (generic CSV/Parquet)")
    min_user_count: int = Field(1, ge=1, description="k-core: drop users with fewer events")
    min_item_count: int = Field(1, ge=1, description="k-core: drop items with fewer events")


# A recipe's `model` table: ModelConfig's fields without n_items.
ModelFields = dict[str, int | float | bool | str | None]


class _ModelRecipe(_Strict):
    """A recipe with model sizes but without `n_items`, which comes from the data."""

    model: ModelFields = Field(default_factory=dict)

    @model_validator(mode="after")
    def _model_fields_valid(self) -> _ModelRecipe:
        if "n_items" in self.model:
            raise ValueError("model.n_items comes from the data; remove it from the recipe")
        # Any catalogue size: checks against the real one wait for the data.
        ModelConfig(n_items=2**31 - 1, **self.model)  # type: ignore[arg-type]
        return self

    def model_config_for(self, n_items: int) -> ModelConfig:
        """The model for a catalogue of `n_items`; a size that does not fit it is a
        ValueError naming the key."""
        try:
            return ModelConfig(n_items=n_items, **self.model)  # type: ignore[arg-type]
        except ValidationError as exc:
            where = validation_message(exc).removeprefix("recipe: ")
            raise ValueError(f"model: {where} in this data set") from None


class TeacherRecipe(_ModelRecipe):
    """A teacher training job: data, model sizes, training."""

    name: str = Field("teacher", pattern=NAME_PATTERN)
    data: DataSpec = DataSpec()
    train: TrainConfig = TrainConfig()


class StudentRecipe(_ModelRecipe):
    """A student trained from a stored teacher (`distill`) or, as the control, from labels only
    (`distill = None`) with the same architecture and budget. Data comes from the teacher."""

    name: str = Field(pattern=NAME_PATTERN)
    teacher: str = Field(description="stored teacher: NAME, NAME@VERSION or NAME@latest")
    train: TrainConfig = TrainConfig()
    distill: DistillConfig | None = DistillConfig()
    init: Literal["random", "teacher"] = Field(
        "random",
        description="'teacher': start from the teacher's weights (same architecture, a "
        "context no longer than the teacher's; the position table is cut to it): a short-"
        "context copy of the teacher, fine-tuned to its window",
    )

    @model_validator(mode="after")
    def _causal_when_distilled(self) -> StudentRecipe:
        if self.distill is not None and self.model.get("bidirectional"):
            raise ValueError(
                "model.bidirectional with [distill]: a bidirectional model trains by cloze "
                "from labels; distil into a causal student (drop bidirectional)"
            )
        return self


R = TypeVar("R", bound=BaseModel)


def validation_message(exc: ValidationError) -> str:
    """First problem of a pydantic error as `where: what` on one line."""
    # Unknown keys first: pydantic's error order differs between releases.
    err = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
    where = ".".join(str(p) for p in err["loc"]) or "recipe"
    msg = str(err["msg"]).removeprefix("Value error, ")
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {msg}{more}"


def load_recipe(path: str, kind: type[R] = TeacherRecipe) -> R:  # type: ignore[assignment]
    """Read a TOML recipe; any problem becomes one line naming the file and the key."""
    import tomllib
    from pathlib import Path

    file = Path(path)
    try:
        raw = tomllib.loads(file.read_text())
    except FileNotFoundError:
        raise ValueError(f"{file}: recipe not found; pass a file under recipes/") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{file}: not a readable TOML recipe ({exc})") from None
    try:
        return kind(**raw)
    except ValidationError as exc:
        raise ValueError(f"{file}: {validation_message(exc)}") from None
