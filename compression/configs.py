"""Validated configuration classes: unknown keys and impossible values are refused."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


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
    emb_dim: int | None = Field(
        None,
        ge=2,
        description="item embedding size; None = hidden. Smaller values factorize "
        "the embedding/output matrix (the bulk of the parameters) through a projection",
    )

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> ModelConfig:
        if self.hidden % self.n_heads:
            raise ValueError(f"hidden={self.hidden} is not divisible by n_heads={self.n_heads}")
        return self

    @property
    def ffn_width(self) -> int:
        return self.ffn or self.hidden


class TrainConfig(_Strict):
    """One training run. Early stopping watches validation NDCG@10."""

    max_epochs: int = Field(200, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    patience: int = Field(10, ge=1, description="evaluations without improvement before stop")
    eval_every: int = Field(1, ge=1, description="epochs between validation runs")
    seed: int = 0
    bf16: bool = Field(True, description="bf16 autocast on CPUs with AVX-512 BF16")
    loss_chunk_rows: int = Field(2048, ge=64, description="positions per cross-entropy chunk")
    time_limit_s: float | None = Field(None, gt=0.0, description="stop after this wall time")
    threads: int | None = Field(None, ge=1, description="torch threads; None = all cores")
    eval_batch_size: int = Field(512, ge=1)
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$", description="torch device")


class DataSpec(_Strict):
    """Where the interactions come from: a file path or `synthetic[:key=value,...]`."""

    path: str = "synthetic"
    fmt: str | None = Field(None, description="event-log format; None = from the file name")
    user_col: str | None = None
    item_col: str | None = None
    time_col: str | None = None
    min_user_count: int = Field(1, ge=1)
    min_item_count: int = Field(1, ge=1)


class TeacherRecipe(_Strict):
    """A teacher training job: data, model sizes (without `n_items`, taken from the data)."""

    name: str = Field("teacher", pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    data: DataSpec = DataSpec()
    model: dict[str, int | float | bool | None] = Field(default_factory=dict)
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _model_fields_valid(self) -> TeacherRecipe:
        if "n_items" in self.model:
            raise ValueError("model.n_items comes from the data; remove it from the recipe")
        ModelConfig(n_items=1, **self.model)  # type: ignore[arg-type]
        return self

    def model_config_for(self, n_items: int) -> ModelConfig:
        return ModelConfig(n_items=n_items, **self.model)  # type: ignore[arg-type]


def validation_message(exc: ValidationError) -> str:
    """First problem of a pydantic error as `where: what` on one line."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "recipe"
    msg = str(err["msg"]).removeprefix("Value error, ")
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {msg}{more}"


def load_recipe(path: str) -> TeacherRecipe:
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
        return TeacherRecipe(**raw)
    except ValidationError as exc:
        raise ValueError(f"{file}: {validation_message(exc)}") from None
