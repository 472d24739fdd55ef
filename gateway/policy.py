"""Invalidation policy: which keys are removed at once, which expire softly, and when.

The background's decision matrix as configuration:

- ``unlink``: removed at once in every region (transactional state, permissions, inventory);
- ``expire``: a soft invalidation, ``PEXPIRE key t LT`` in every region, ``t`` drawn inside the
  region's *staggered* slot of the rule's window, so regions (and keys within a burst) do not
  expire together and refill the origin all at once;
- ``hybrid``: unlink in the writer's region, expire elsewhere (a conservative TTL plus busting).

Rules map key patterns to a mode and window; the first rule whose pattern matches a key wins, and
keys no rule matches get the default. An event may ask for a mode: a stricter one is always
honoured; a softer one only where the rule says ``allow_softer``.

Staggering: the rule's window ``[lo, hi]`` is cut into one slot per region of the topology
(regions sorted by name; or set ``stagger_slot``/``stagger_slots``). Region ``i`` of ``n`` draws
``t = lo + (i + u) * (hi - lo) / n`` with ``u`` uniform in ``[0, 1)``: regions' expiries never
coincide, and keys of one burst spread evenly across the region's slot.
"""

from __future__ import annotations

import fnmatch
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import msgspec

from invalgw.proto import WILDCARDS

Mode = Literal["unlink", "expire", "hybrid"]
STRICTNESS: dict[str, int] = {"expire": 0, "hybrid": 1, "unlink": 2}


class Rule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Keys matching ``pattern`` (shell-style glob: ``*``, ``?``, ``[abc]``) get ``mode``."""

    pattern: str
    mode: Mode
    window_ms: tuple[int, int] | None = None
    """Soft-expiry window ``[lo, hi]`` in ms for this rule; default: the policy's window."""
    allow_softer: bool = True
    """Whether an event may ask for a softer mode than ``mode`` for these keys."""

    def __post_init__(self) -> None:
        if not self.pattern:
            raise ValueError("pattern: must not be empty")
        if self.window_ms is not None:
            _check_window(self.window_ms)


class Policy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The ``[policy]`` section of a region file."""

    default_mode: Mode = "unlink"
    expire_window_ms: tuple[int, int] = (2000, 10_000)
    stagger: bool = True
    """Give each region its own slot of the window (False: every region uses all of it)."""
    stagger_slot: int | None = None
    """This region's slot; default: its position among the topology's regions sorted by name."""
    stagger_slots: int | None = None
    """How many slots the window is cut into; default: the number of regions."""
    fence_ttl_ms: int = 60_000
    """How long a versioned invalidation's tombstone refuses older fills."""
    resync_patterns: list[str] = []
    """On a gap (invalidations from an origin may be lost), soft-expire the keys matching these
    patterns in this region, within the default window: the resync."""
    rules: list[Rule] = []

    def __post_init__(self) -> None:
        _check_window(self.expire_window_ms)
        if (self.stagger_slot is None) != (self.stagger_slots is None):
            raise ValueError("stagger_slot: set stagger_slot and stagger_slots together")
        slot, slots = self.stagger_slot, self.stagger_slots
        if slot is not None and slots is not None and not 0 <= slot < slots:
            raise ValueError("stagger_slot: must be in [0, stagger_slots)")
        if self.fence_ttl_ms <= 0:
            raise ValueError("fence_ttl_ms: must be positive")


def _check_window(window: tuple[int, int]) -> None:
    lo, hi = window
    if not 0 < lo <= hi:
        raise ValueError(f"window {list(window)} must be [lo, hi] with 0 < lo <= hi (ms)")


@dataclass(frozen=True)
class Decision:
    """What one region does with one key: unlink it, or expire it within ``window_ms``."""

    unlink: bool
    window_ms: tuple[float, float] = (0.0, 0.0)
    """This region's staggered slot of the rule's window (for a soft invalidation)."""


UNLINK = Decision(unlink=True)


class Resolver:
    """Applies a :class:`Policy` in one region of a topology."""

    def __init__(
        self, policy: Policy, region: str, regions: list[str], *, rng: random.Random | None = None
    ) -> None:
        self.policy = policy
        self.region = region
        if policy.stagger_slot is not None and policy.stagger_slots is not None:
            self.slot, self.slots = policy.stagger_slot, policy.stagger_slots
        elif policy.stagger:
            ordered = sorted({region, *regions})
            self.slot, self.slots = ordered.index(region), len(ordered)
        else:
            self.slot, self.slots = 0, 1
        self._rules = [(_matcher(rule.pattern), rule) for rule in policy.rules]
        self.always_unlink = not policy.rules and policy.default_mode == "unlink"
        """True when every key is unlinked unless an event asks for a softer mode."""
        self._random = (rng or random.Random()).random

    def slot_window(self, window: tuple[int, int]) -> tuple[float, float]:
        """This region's part of ``window``: ``[lo + i*w, lo + (i+1)*w]`` with ``w = (hi-lo)/n``."""
        lo, hi = window
        width = (hi - lo) / self.slots
        return lo + self.slot * width, lo + (self.slot + 1) * width

    def rule_for(self, key: str) -> Rule | None:
        for matches, rule in self._rules:
            if matches(key):
                return rule
        return None

    def decide(self, key: str, requested: str, origin: str) -> Decision:
        """The effect in this region of an invalidation of ``key`` written in ``origin``.

        ``requested`` is the event's op: a mode, or ``invalidate`` to let the policy decide.
        """
        rule = self.rule_for(key)
        mode: str = rule.mode if rule else self.policy.default_mode
        if requested in STRICTNESS and requested != mode:
            softer = STRICTNESS[requested] < STRICTNESS[mode]
            if not softer or rule is None or rule.allow_softer:
                mode = requested
        if mode == "unlink" or (mode == "hybrid" and origin == self.region):
            return UNLINK
        window = rule.window_ms if rule and rule.window_ms else self.policy.expire_window_ms
        return Decision(unlink=False, window_ms=self.slot_window(window))

    def expiry_ms(self, decision: Decision) -> int:
        """A TTL drawn uniformly inside the decision's slot (at least 1 ms)."""
        lo, hi = decision.window_ms
        return max(1, int(lo + self._random() * (hi - lo)))


def _matcher(pattern: str) -> Callable[[str], bool]:
    """A fast test for one glob: plain prefix patterns use ``startswith``."""
    body = pattern[:-1]
    if pattern.endswith("*") and not any(c in body for c in WILDCARDS):
        return lambda key: key.startswith(body)
    if not any(c in pattern for c in WILDCARDS):
        return lambda key: key == pattern
    regex = re.compile(fnmatch.translate(pattern), re.DOTALL)
    return lambda key: regex.match(key) is not None


def literal_prefix(pattern: str) -> str:
    """The part of a glob before its first wildcard (what a SCAN can be narrowed by)."""
    for i, char in enumerate(pattern):
        if char in WILDCARDS:
            return pattern[:i]
    return pattern
