"""Router: weighted split, stickiness, override, unknown variants, weight validation."""

from __future__ import annotations

from collections import Counter

import pytest

from app.routing import Router, UnknownVariantError


def test_ten_thousand_users_split_within_two_percent_of_the_weights() -> None:
    router = Router({"a": 0.7, "b": 0.2, "c": 0.1}, salt="exp-1")
    counts = Counter(router.assign(f"user-{i}") for i in range(10_000))
    for name, weight in {"a": 0.7, "b": 0.2, "c": 0.1}.items():
        assert abs(counts[name] / 10_000 - weight) <= 0.02, counts


def test_a_user_always_gets_the_same_variant_across_router_instances() -> None:
    first = Router({"a": 1, "b": 1}, salt="exp-1")
    again = Router({"b": 1, "a": 1}, salt="exp-1")  # another replica, other dict order
    users = [f"u{i}" for i in range(500)]
    assert [first.assign(u) for u in users] == [again.assign(u) for u in users]
    assert [first.assign(u) for u in users] == [first.assign(u) for u in users]


def test_another_salt_reshuffles_users() -> None:
    a, b = Router({"a": 1, "b": 1}, salt="exp-1"), Router({"a": 1, "b": 1}, salt="exp-2")
    moved = sum(a.assign(f"u{i}") != b.assign(f"u{i}") for i in range(2000))
    assert 800 < moved < 1200  # about half change sides


def test_override_wins_and_unknown_variant_is_refused() -> None:
    router = Router({"a": 1.0, "b": 0.0}, salt="s")
    assert all(router.assign(f"u{i}") == "a" for i in range(1000))  # zero weight: never
    assert router.assign("u1", override="b") == "b"
    with pytest.raises(UnknownVariantError, match="unknown variant 'zz'; known variants: a, b"):
        router.assign("u1", override="zz")


@pytest.mark.parametrize(
    "weights, message",
    [({"a": 0.0}, "at least one"), ({"a": -1.0}, ">= 0"),
     ({"a": float("nan")}, ">= 0")],
)  # fmt: skip
def test_bad_weights_are_refused(weights: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Router(weights, salt="s")


def test_sampling_fraction() -> None:
    router = Router({"a": 1}, salt="s", seed=0)
    hits = sum(router.sample(0.25) for _ in range(10_000))
    assert 2300 < hits < 2700
    assert not any(router.sample(0.0) for _ in range(100))


def test_a_router_without_variants_refuses_every_request() -> None:
    router = Router({}, salt="s")
    with pytest.raises(UnknownVariantError):
        router.assign("u1")
