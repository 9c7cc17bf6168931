"""Request and response bodies; bounds are part of the OpenAPI schema (fuzzers read them)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.settings import VARIANT_PATTERN

ItemId = Annotated[int, Field(ge=0, le=2**63 - 1)]
# Upper bounds here are the schema's hard limits; settings can only make them stricter.
MAX_HISTORY = 100_000
MAX_K = 10_000


class RecommendRequest(BaseModel):
    # strict: a JSON string, float or boolean is never coerced into an id, k or flag.
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"user_id": "u42", "history": [1193, 661, 914], "k": 10}]},
    )

    user_id: str = Field(min_length=1, max_length=128, description="routes sticky A/B")
    history: list[ItemId] = Field(
        max_length=MAX_HISTORY, description="original item ids, oldest first"
    )
    k: int = Field(10, ge=1, le=MAX_K, description="how many items to return")
    exclude_history: bool = Field(True, description="never recommend items in the history")
    variant: str | None = Field(None, pattern=VARIANT_PATTERN, description="force a variant")


class BatchRecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    requests: list[RecommendRequest] = Field(min_length=1, max_length=1024)


class ScoredItem(BaseModel):
    item_id: int | str
    score: float


class RecommendResponse(BaseModel):
    items: list[ScoredItem]
    variant: str
    model_version: str = Field(description="NAME@VERSION of the model that answered")
    source: Literal["model", "popular"] = Field(
        description="'popular' when no history item was known to the model"
    )
    unknown_items: int = Field(description="history ids dropped as unknown to the model")


class BatchRecommendResponse(BaseModel):
    results: list[RecommendResponse]


class ErrorBody(BaseModel):
    error: str = Field(description="what is wrong and how to fix it")
    code: str = Field(description="stable machine-readable code")
    request_id: str | None = None


class RoutingUpdate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"weights": {"teacher": 0.9, "student": 0.1}}]},
    )

    weights: dict[
        Annotated[str, Field(pattern=VARIANT_PATTERN)],
        Annotated[float, Field(ge=0, allow_inf_nan=False)],
    ]


class ReloadRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"variant": "teacher", "model": "ml1m-teacher@2"}]},
    )

    variant: str = Field(pattern=VARIANT_PATTERN)
    model: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*(@(\d+|latest))?$",
        description="stored model: NAME, NAME@VERSION or NAME@latest",
    )
