"""Request and response bodies; bounds are part of the OpenAPI schema (fuzzers read them)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)
from pydantic_core import InitErrorDetails

from app.settings import VARIANT_PATTERN
from model_store.item_ids import MAX_ITEM_ID_LENGTH

# An item id as the catalogue spells it ("007", "B00ABC12"), or a JSON integer that stands for
# its decimal string (7 means "7", never "007"). The models are strict: no floats, booleans
# or other types. No pattern: catalogue ids are any string the data held (model_store.item_ids).


def _integral(value: Any) -> Any:
    """JSON Schema's `integer` admits 7.0 (a number without a fraction), so the server does
    too: what the schema allows is served. 7.5, strings and booleans stay refused."""
    if type(value) is float and value.is_integer():
        return int(value)
    return value


# An integer as JSON Schema defines it: 7 or 7.0, never "7" or true. (The validator goes
# after the bounds so that they stay JSON Schema `minimum`/`maximum`.)
JSON_INT = BeforeValidator(_integral)
ItemId = Annotated[
    Annotated[str, Field(min_length=1, max_length=MAX_ITEM_ID_LENGTH)]
    | Annotated[int, Field(ge=0, le=2**63 - 1), JSON_INT],
    Field(description="an item id as in the catalogue, or an integer for its decimal string"),
]
_UNION_MEMBERS = {  # pydantic's loc tags of the union's members
    "constrained-str": str,
    "function-before[_integral(), constrained-int]": int,
}


class _ItemIdErrors(BaseModel):
    """Reports one error per bad history item: the union's member for the JSON type sent."""

    @classmethod
    def model_validate_json(cls, json_data: str | bytes | bytearray, **kwargs: Any) -> Self:
        try:
            return super().model_validate_json(json_data, **kwargs)
        except ValidationError as exc:
            raise _one_error_per_item(exc) from None


def _one_error_per_item(exc: ValidationError) -> ValidationError:
    """A union reports every member's error ("history.0.constrained-int: ..." and
    "history.0.constrained-str: ..."); keep the string member's error for a string, the
    integer member's for anything else, at "history.0"."""
    errors = exc.errors(include_url=False)
    if not any(e["loc"] and e["loc"][-1] in _UNION_MEMBERS for e in errors):
        return exc
    details = []
    for e in errors:
        loc = e["loc"]
        if loc and loc[-1] in _UNION_MEMBERS:
            if _UNION_MEMBERS[str(loc[-1])] is not (str if isinstance(e["input"], str) else int):
                continue
            loc = loc[:-1]
        detail = InitErrorDetails(type=e["type"], loc=loc, input=e["input"])
        if "ctx" in e:
            detail["ctx"] = e["ctx"]
        details.append(detail)
    try:
        return ValidationError.from_exception_data(exc.title, details, input_type="json")
    except Exception:  # an error type that cannot be rebuilt: the original is still right
        return exc


# Upper bounds here are the schema's hard limits; settings can only make them stricter.
MAX_HISTORY = 100_000
MAX_K = 10_000


class RecommendRequest(_ItemIdErrors):
    # strict: a JSON string, float or boolean is never coerced into an id, k or flag.
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"user_id": "u42", "history": [1193, 661, 914], "k": 10}]},
    )

    user_id: str = Field(min_length=1, max_length=128, description="routes sticky A/B")
    history: list[ItemId] = Field(
        max_length=MAX_HISTORY,
        description="original item ids (strings as in the catalogue, or integers), oldest first",
    )
    k: Annotated[int, Field(ge=1, le=MAX_K), JSON_INT] = Field(
        10, description="how many items to return"
    )
    exclude_history: bool = Field(True, description="never recommend items in the history")
    variant: str | None = Field(None, pattern=VARIANT_PATTERN, description="force a variant")


class BatchRecommendRequest(_ItemIdErrors):
    model_config = ConfigDict(extra="forbid", strict=True)

    requests: list[RecommendRequest] = Field(min_length=1, max_length=1024)


# The fast path: most requests carry plain integer ids. Validating `str | int` with the
# integral-number rule costs ~28 µs for a 165-item history on the event loop, plain strict
# ints ~9 µs (measured; at 64 connections the difference was ~7% of throughput). The API
# parses with these first and falls back to the full models above on any error, so what is
# accepted and every error message are the full models'. `fail_fast`: a string id ends the
# attempt at the first item instead of collecting an error per item.
class FastRecommendRequest(RecommendRequest):
    history: list[Annotated[int, Field(ge=0, le=2**63 - 1)]] = Field(  # type: ignore[assignment]
        max_length=MAX_HISTORY, fail_fast=True
    )
    k: int = Field(10, ge=1, le=MAX_K)  # type: ignore[assignment]


class FastBatchRecommendRequest(BatchRecommendRequest):
    requests: list[FastRecommendRequest] = Field(  # type: ignore[assignment]
        min_length=1, max_length=1024, fail_fast=True
    )


FAST_MODELS: dict[type[BaseModel], type[BaseModel]] = {
    RecommendRequest: FastRecommendRequest,
    BatchRecommendRequest: FastBatchRecommendRequest,
}


class ScoredItem(BaseModel):
    item_id: str = Field(description="the catalogue's item id, spelled exactly as in the data")
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


MAX_WEIGHT = 1e6  # weights are relative; a bound keeps their sum finite


def _weights_schema(schema: dict[str, Any]) -> None:
    """pydantic writes key patterns as `patternProperties`, which leaves other keys allowed;
    `propertyNames` says what the server enforces: every key matches."""
    ((pattern, value),) = schema.pop("patternProperties").items()
    schema["propertyNames"] = {"pattern": pattern}
    schema["additionalProperties"] = value
    schema["not"] = {"additionalProperties": {"maximum": 0}}  # not every weight is 0


class RoutingUpdate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"weights": {"teacher": 0.9, "student": 0.1}}]},
    )

    # The schema says all the server checks: 1..64 names, each weight in [0, MAX_WEIGHT], and
    # not every weight 0 (`not: every value <= 0`); names unknown to the service are a 404.
    weights: dict[
        Annotated[str, Field(pattern=VARIANT_PATTERN)],
        Annotated[float, Field(ge=0, le=MAX_WEIGHT, allow_inf_nan=False)],
    ] = Field(
        min_length=1,
        max_length=64,
        description="traffic share per variant (normalized; variants left out get 0); "
        "at least one must be > 0",
        json_schema_extra=_weights_schema,
    )

    @field_validator("weights")
    @classmethod
    def _one_positive(cls, value: dict[str, float]) -> dict[str, float]:
        if not any(w > 0 for w in value.values()):
            raise ValueError(f"at least one weight must be > 0, got {value}")
        return value


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
