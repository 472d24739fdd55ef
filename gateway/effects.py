"""What a batch of invalidations does to one region's cache, decided before touching Redis.

The policy turns each key of each invalidation into one effect in this region: an UNLINK, a soft
``PEXPIRE … LT`` with a TTL drawn in the region's staggered slot, or (for versioned invalidations)
a fenced variant of either that also leaves a tombstone. Pattern invalidations become scan jobs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from invalgw.policy import Resolver
from invalgw.proto import Invalidation

Key = str | bytes
"""A key as a producer named it (text) or as a pattern walk found it (bytes, maybe not UTF-8)."""


def key_text(key: Key) -> str:
    """``key`` as text for matching policy rules; bytes that are not UTF-8 become lone
    surrogates, so the text maps back to exactly these bytes (never sent to Redis as text)."""
    return key if isinstance(key, str) else key.decode(errors="surrogateescape")


@dataclass
class Plan:
    unlink: list[Key] = field(default_factory=list)
    expire: list[tuple[Key, int]] = field(default_factory=list)
    """(key, ttl in ms) for ``PEXPIRE key ttl LT``."""
    fenced: list[tuple[Key, str, int]] = field(default_factory=list)
    """(key, version, ttl in ms or 0 to unlink) for versioned invalidations."""
    scans: list[Invalidation] = field(default_factory=list)
    """Pattern invalidations, run in the background by the scanner."""

    def __bool__(self) -> bool:
        return bool(self.unlink or self.expire or self.fenced)

    def extend(self, other: Plan) -> None:
        """Add ``other``'s effects (not its scans) to this plan."""
        self.unlink += other.unlink
        self.expire += other.expire
        self.fenced += other.fenced

    def keys(self) -> set[Key]:
        """Every key an effect of this plan touches."""
        return {*self.unlink, *(key for key, _ in self.expire), *(f[0] for f in self.fenced)}

    @property
    def only_unlink(self) -> bool:
        return not self.expire and not self.fenced


def plan_keys(
    plan: Plan, keys: Iterable[Key], op: str, version: str | None, origin: str, resolver: Resolver
) -> None:
    """Add the effects of invalidating ``keys`` (asked as ``op``) to ``plan``."""
    if version is None and resolver.always_unlink and op in ("unlink", "invalidate"):
        plan.unlink.extend(keys)
        return
    for key in keys:
        decision = resolver.decide(key_text(key), op, origin)
        ttl = 0 if decision.unlink else resolver.expiry_ms(decision)
        if version is not None:
            plan.fenced.append((key, version, ttl))
        elif ttl:
            plan.expire.append((key, ttl))
        else:
            plan.unlink.append(key)


def plan_batch(events: Sequence[Invalidation], origin: str, resolver: Resolver) -> Plan:
    """The effects in this region of ``events`` written in ``origin``."""
    plan = Plan()
    if resolver.always_unlink and all(map(_plain_unlink, events)):  # the usual batch, at once
        plan.unlink = [key for event in events for key in event.keys]
        return plan
    for event in events:
        if event.pattern is not None:
            plan.scans.append(event)
        else:
            plan_keys(plan, event.keys, event.op, event.version, origin, resolver)
    return plan


def _plain_unlink(event: Invalidation) -> bool:
    """Whether ``event`` unlinks its keys under a policy without rules (no pattern, no fence)."""
    return event.pattern is None and event.version is None and event.op in ("unlink", "invalidate")
