"""The integer fast path (app/schemas.py FAST_MODELS) accepts only what the full models
accept, parses it to the same values, and leaves everything else to the full models."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from app.schemas import FAST_MODELS, BatchRecommendRequest, RecommendRequest

ONE = {"user_id": "u", "history": [1, 2, 3], "k": 5, "exclude_history": False, "variant": "a"}
BODIES = [
    ONE,
    {"user_id": "u", "history": []},
    {"user_id": "u", "history": [2**63 - 1]},
    {"user_id": "u", "history": ["007", 7]},  # strings: full model only
    {"user_id": "u", "history": [7.0], "k": 3.0},  # integral numbers: full model only
    {"user_id": "u", "history": [True]},  # refused by both
    {"user_id": "u", "history": [1], "k": 0},
    {"user_id": "u", "history": [-1]},
    {"user_id": "u", "history": [1], "extra": 1},
]


@pytest.mark.parametrize("model", [RecommendRequest, BatchRecommendRequest])
@pytest.mark.parametrize("body", BODIES)
def test_fast_accepts_a_subset_with_equal_values(model: type, body: dict) -> None:
    payload = {"requests": [body]} if model is BatchRecommendRequest else body
    raw = json.dumps(payload).encode()
    try:
        full = model.model_validate_json(raw).model_dump()
    except ValidationError:
        full = None
    try:
        fast = FAST_MODELS[model].model_validate_json(raw).model_dump()
    except ValidationError:
        fast = None
    if fast is not None:  # what the fast path takes, the full model takes, equally
        assert full is not None and {
            k: ([str(i) for i in v] if k == "history" else v) for k, v in fast.items()
        } == {k: ([str(i) for i in v] if k == "history" else v) for k, v in full.items()}
    if body is ONE:
        assert fast is not None  # the common case does take the fast path
    if "007" in json.dumps(body) or "7.0" in json.dumps(body):
        assert fast is None and full is not None
