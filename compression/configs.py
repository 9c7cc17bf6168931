"""Validated configuration classes: unknown keys and impossible values are refused."""

from __future__ import annotations

from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """SASRec-style causal Transformer; teacher and students differ only in these numbers."""

    n_items: int = Field(gt=0, description="catalogue size; internal ids 1..n_items, 0 = padding")
    max_len: int = Field(200, ge=1, le=4096, description="most recent items the model reads")
    hidden: int = Field(64, ge=4, le=4096)
    n_blocks: int = Field(2, ge=1, le=48)
    n_heads: int = Field(1, ge=1, le=64)
    ffn: int | None = Field(None, ge=4, description="feed-forward width; None = hidden")
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    tied: bool = Field(True, description="score against the input item embeddings")
    positions: Literal["from_start", "from_end"] = Field(
        "from_start",
        description="count positions from the oldest item read (consistent "
        "between training and inference) or back from the newest (original SASRec)",
    )
    emb_dim: int | None = Field(
        None,
        ge=2,
        description="item embedding size; None = hidden. Smaller values factorize "
        "the embedding/output matrix (the bulk of the parameters) through a projection",
    )
    emb_cutoffs: tuple[int, ...] | None = Field(
        None,
        description="mixed-dimension item embeddings: popularity ranks where the item "
        "vector width changes (the most popular items first); needs emb_dims",
    )
    emb_dims: tuple[int, ...] | None = Field(
        None,
        description="vector width of each popularity bucket, one more than emb_cutoffs; "
        "every bucket is projected to hidden, so the item space is hidden-wide",
    )
    emb_codebooks: int | None = Field(
        None,
        ge=1,
        description="product-quantized item embeddings: each item vector (emb_dim or hidden "
        "wide) is this many codes into as many trained codebooks; a student takes its "
        "codes from the teacher's item matrix (compression/coded_embedding.py)",
    )
    emb_centroids: int = Field(
        256, ge=2, le=65535, description="rows of each codebook (with emb_codebooks)"
    )

    item_tower: int | None = Field(
        None,
        ge=2,
        description="score items with vectors this wide, made from each item's emb_dim-wide "
        "embedding by a residual MLP (linear map + one GELU layer of this width); None = "
        "score the embedding itself. A narrow table's scores are then no longer limited to "
        "its rank, for ~(2 emb_dim + width + hidden) x width parameters; the exported graph "
        "stores the computed [n_items + 1, width] matrix",
    )
    successors: int | None = Field(
        None,
        ge=1,
        le=256,
        description="sparse successor lists: also score each of the last successor_lags "
        "items' this many most frequent next items (ids fixed from the training sequences, "
        "one trained weight per lag and slot; compression/successors.py). The ids count as "
        "parameters. None = dense scores only",
    )
    successor_lags: int = Field(
        3, ge=1, le=16, description="how many of the most recent items the successor lists read"
    )
    shared_blocks: bool = Field(
        False,
        description="every block applies the same weights (cross-layer sharing, ALBERT): "
        "n_blocks layers of depth for one block's parameters",
    )
    head_dim: int | None = Field(
        None,
        ge=1,
        description="width of one attention head; None = hidden // n_heads. Set by head "
        "pruning, where n_heads * head_dim (the attention's inner width) differs from hidden",
    )

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> ModelConfig:
        if self.head_dim is None and self.hidden % self.n_heads:
            raise ValueError(f"hidden={self.hidden} is not divisible by n_heads={self.n_heads}")
        return self

    @model_validator(mode="after")
    def _mixed_dims(self) -> ModelConfig:
        cuts, dims = self.emb_cutoffs, self.emb_dims
        if cuts is None and dims is None:
            return self
        if cuts is None or dims is None or len(dims) != len(cuts) + 1:
            raise ValueError(
                f"emb_cutoffs={cuts} and emb_dims={dims}: give both, with one more width "
                "than cutoffs (e.g. emb_cutoffs = [300, 1200], emb_dims = [48, 16, 8])"
            )
        if list(cuts) != sorted(set(cuts)) or cuts[0] < 1 or cuts[-1] >= self.n_items:
            raise ValueError(
                f"emb_cutoffs={list(cuts)}: must rise strictly, within 1..n_items-1 "
                f"(n_items={self.n_items})"
            )
        if min(dims) < 1:
            raise ValueError(f"emb_dims={list(dims)}: every width must be at least 1")
        if self.emb_dim is not None or not self.tied:
            raise ValueError(
                "mixed-dimension embeddings (emb_cutoffs) replace emb_dim and need tied=true"
            )
        return self

    @model_validator(mode="after")
    def _coded(self) -> ModelConfig:
        if self.emb_codebooks is None:
            return self
        width = self.emb_dim or self.hidden
        if width % self.emb_codebooks:
            raise ValueError(
                f"emb_codebooks={self.emb_codebooks} does not divide the item vector width "
                f"{width} (emb_dim or hidden)"
            )
        if self.emb_cutoffs is not None or not self.tied:
            raise ValueError("coded embeddings (emb_codebooks) exclude emb_cutoffs and need tied")
        if self.emb_centroids > self.n_items:
            raise ValueError(
                f"emb_centroids={self.emb_centroids} exceeds the catalogue ({self.n_items} items)"
            )
        return self

    @property
    def ffn_width(self) -> int:
        return self.ffn or self.hidden

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.hidden // self.n_heads


class TrainConfig(_Strict):
    """One training run. Early stopping watches validation NDCG@10."""

    max_epochs: int = Field(200, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    patience: int = Field(10, ge=1, description="evaluations without improvement before stop")
    eval_every: int = Field(1, ge=1, description="epochs between validation runs")
    lr_decay_factor: float = Field(0.3, gt=0.0, lt=1.0)
    lr_decay_patience: int = Field(
        5,
        ge=1,
        description="evaluations without improvement before restoring the best "
        "weights and multiplying lr by lr_decay_factor",
    )
    max_lr_decays: int = Field(0, ge=0, description="0 = constant lr, plain early stopping")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant",
        description="'cosine': lr falls from `lr` to 0 along a half cosine over max_epochs "
        "epochs, step by step (a fixed horizon instead of reacting to a noisy validation)",
    )
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
    seed: int = 0
    bf16: bool = Field(
        True,
        description="bf16 autocast where it is fast: CUDA, or CPUs with AVX-512 BF16 / AMX; "
        "elsewhere (e.g. AVX2-only CPUs, where it is emulated ~30x slower) training stays fp32",
    )
    loss_chunk_rows: int = Field(2048, ge=64, description="positions per cross-entropy chunk")
    time_limit_s: float | None = Field(None, gt=0.0, description="stop after this wall time")
    threads: int | None = Field(None, ge=1, description="torch threads; None = all cores")
    eval_batch_size: int = Field(512, ge=1)
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$", description="torch device")

    @model_validator(mode="after")
    def _one_lr_policy(self) -> TrainConfig:
        if self.lr_schedule == "cosine" and self.max_lr_decays:
            raise ValueError(
                f"lr_schedule='cosine' with max_lr_decays={self.max_lr_decays}: choose one "
                "(set max_lr_decays = 0 or lr_schedule = 'constant')"
            )
        return self


class DistillConfig(_Strict):
    """Distillation loss and adaptive strategy; the rules are in `compression.distill`."""

    alpha: float = Field(0.5, ge=0.0, le=1.0, description="KL weight; 1 - alpha goes to L2")
    temperature: float = Field(2.0, gt=0.0)
    beta: float = Field(0.0, ge=0.0, description="hard-label cross-entropy weight")
    l2_target: Literal["logits", "probs"] = "logits"
    top_k: int | None = Field(None, ge=1, description="teacher top-K soft targets only")
    strategy: Literal["fixed", "reliability", "plateau"] = "fixed"
    plateau_patience: int = Field(2, ge=1)
    alpha_step: float = Field(0.25, gt=0.0, le=1.0)
    min_teacher_weight: float = Field(0.0, ge=0.0, le=1.0)
    near_teacher_ratio: float = Field(0.97, gt=0.0, le=1.0)
    temperature_decay: float = Field(0.5, gt=0.0, le=1.0)
    chunk_rows: int = Field(1024, ge=16)
    cache_teacher: bool = Field(
        True,
        description="with top_k: compute the teacher's targets once before training instead "
        "of on every batch (memory: ~4 bytes x top_k per training position)",
    )
    augment_copies: int = Field(
        0,
        ge=0,
        le=8,
        description="function matching: corrupted copies of the training inputs, each with "
        "the teacher's targets on the corrupted input (needs top_k and cache_teacher)",
    )
    augment_substitute: float = Field(
        0.15, gt=0.0, lt=1.0, description="share of history items a copy replaces at random"
    )
    augment_seed: int = 0

    @model_validator(mode="after")
    def _augment_needs_cache(self) -> DistillConfig:
        if self.augment_copies and (self.top_k is None or not self.cache_teacher):
            raise ValueError(
                f"augment_copies={self.augment_copies} needs cached teacher targets: set top_k "
                "and keep cache_teacher = true"
            )
        return self


class DataSpec(_Strict):
    """Where the interactions come from: a file path or `synthetic[:key=value,...]`."""

    path: str = "synthetic"
    fmt: str | None = Field(None, description="event-log format; None = from the file name")
    user_col: str | None = None
    item_col: str | None = None
    time_col: str | None = None
    min_user_count: int = Field(1, ge=1)
    min_item_count: int = Field(1, ge=1)


# A recipe's `model` table: ModelConfig's fields without n_items (lists: emb_cutoffs/dims).
ModelFields = dict[str, int | float | bool | str | list[int] | None]


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
        """The model for a catalogue of `n_items`; a size that does not fit it (e.g. an
        emb_cutoffs rank beyond the catalogue) is a ValueError naming the key."""
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
