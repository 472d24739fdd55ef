"""Policy rules: matching, precedence, defaults, and the staggered expiry math (no Redis)."""

from __future__ import annotations

import itertools
import random

import pytest

from invalgw.policy import Policy, Resolver, Rule, literal_prefix

REGIONS = ["ap-south", "eu-west", "us-east"]
POLICY = Policy(
    default_mode="unlink",
    expire_window_ms=(1000, 4000),
    rules=[
        Rule(pattern="session:*", mode="unlink", allow_softer=False),
        Rule(pattern="catalog:*", mode="expire", window_ms=(2000, 10_000)),
        Rule(pattern="catalog:hot:*", mode="unlink"),  # shadowed: the first match wins
        Rule(pattern="price:[0-9]*", mode="hybrid"),
        Rule(pattern="exact-key", mode="expire"),
    ],
)


@pytest.mark.parametrize(
    ("key", "requested", "origin", "region", "unlink", "window"),
    [
        # no rule matches: the default mode
        ("user:1", "invalidate", "us-east", "eu-west", True, None),
        # an event may ask for a softer mode where the rule allows it (no rule: allowed)
        ("user:1", "expire", "us-east", "eu-west", False, (2000, 3000)),
        # rule: expire within 2-10 s; eu-west is slot 1 of 3
        ("catalog:1", "invalidate", "us-east", "eu-west", False, (4666.67, 7333.33)),
        ("catalog:1", "invalidate", "us-east", "ap-south", False, (2000, 4666.67)),
        ("catalog:1", "invalidate", "us-east", "us-east", False, (7333.33, 10_000)),
        # a stricter mode is always honoured
        ("catalog:1", "unlink", "us-east", "eu-west", True, None),
        # a softer mode is refused where the rule forbids it
        ("session:9", "expire", "us-east", "eu-west", True, None),
        ("session:9", "hybrid", "us-east", "eu-west", True, None),
        # first match wins: catalog:hot:* is shadowed by catalog:*
        ("catalog:hot:1", "invalidate", "us-east", "eu-west", False, (4666.67, 7333.33)),
        # hybrid: unlink in the writer's region, expire elsewhere
        ("price:42", "invalidate", "eu-west", "eu-west", True, None),
        ("price:42", "invalidate", "eu-west", "us-east", False, (3000, 4000)),
        ("price:x", "invalidate", "eu-west", "us-east", True, None),
        # hybrid asked by the event, no rule
        ("user:1", "hybrid", "ap-south", "ap-south", True, None),
        ("user:1", "hybrid", "ap-south", "us-east", False, (3000, 4000)),
        # exact patterns match only themselves
        ("exact-key", "invalidate", "us-east", "us-east", False, (3000, 4000)),
        ("exact-key2", "invalidate", "us-east", "us-east", True, None),
    ],
)
def test_decisions(
    key: str,
    requested: str,
    origin: str,
    region: str,
    unlink: bool,
    window: tuple[float, float] | None,
) -> None:
    decision = Resolver(POLICY, region, REGIONS).decide(key, requested, origin)
    assert decision.unlink is unlink
    if window is not None:
        assert decision.window_ms == pytest.approx(window, abs=0.01)


def test_default_mode_applies_to_unmatched_keys() -> None:
    soft = Policy(default_mode="expire", expire_window_ms=(100, 400))
    decision = Resolver(soft, "a", ["a"]).decide("anything", "invalidate", "a")
    assert not decision.unlink
    assert decision.window_ms == (100, 400)


def test_slots_partition_the_window_without_overlap() -> None:
    windows = [Resolver(POLICY, r, REGIONS).slot_window((2000, 10_000)) for r in REGIONS]
    assert windows[0][0] == 2000
    assert windows[-1][1] == pytest.approx(10_000)
    for (_, hi), (lo, _) in itertools.pairwise(windows):
        assert hi == pytest.approx(lo)


def test_explicit_slot_overrides_the_topology() -> None:
    policy = Policy(stagger_slot=3, stagger_slots=4, expire_window_ms=(0 + 1, 4001))
    assert Resolver(policy, "a", ["a", "b"]).slot_window((1, 4001)) == (3001, 4001)


def test_no_stagger_uses_the_whole_window() -> None:
    policy = Policy(stagger=False)
    assert Resolver(policy, "b", ["a", "b", "c"]).slot_window((2000, 8000)) == (2000, 8000)


def test_expiry_draws_are_uniform_inside_the_slot() -> None:
    resolver = Resolver(POLICY, "eu-west", REGIONS, rng=random.Random(7))
    decision = resolver.decide("catalog:1", "invalidate", "us-east")
    lo, hi = decision.window_ms
    draws = [resolver.expiry_ms(decision) for _ in range(30_000)]
    assert all(lo - 1 <= t <= hi for t in draws)
    # ten equal bins each hold 10% of the draws, within 1.5 percentage points
    bins = [0] * 10
    for t in draws:
        bins[min(9, int((t - lo) / (hi - lo) * 10))] += 1
    assert all(abs(count / len(draws) - 0.1) < 0.015 for count in bins)


@pytest.mark.parametrize(
    ("pattern", "prefix"),
    [
        ("catalog:*", "catalog:"),
        ("{user:1}:*", "{user:1}:"),
        ("a?b", "a"),
        ("plain", "plain"),
        ("[ab]x", ""),
    ],
)
def test_literal_prefix(pattern: str, prefix: str) -> None:
    assert literal_prefix(pattern) == prefix


@pytest.mark.parametrize(
    "bad",
    [
        {"expire_window_ms": (0, 10)},
        {"expire_window_ms": (10, 5)},
        {"stagger_slot": 1},
        {"stagger_slot": 3, "stagger_slots": 3},
        {"fence_ttl_ms": 0},
    ],
)
def test_invalid_policies_are_refused(bad: dict[str, object]) -> None:
    import msgspec

    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(bad, Policy)
