"""Tier policy: which tier an `auto` request gets, from the operator's choice or from load.

`fixed`: every auto request gets `default_tier`. `load`: a ladder of (threshold, tier) steps. Level 0 is
`default_tier`; level i >= 1 applies when load >= ladder[i-1].threshold. The policy climbs as soon as the
load reaches a step and steps back down only when the load falls below the current step's threshold minus
`hysteresis`, so load hovering at a threshold does not make the tier flap.
Load is waiting + running requests (`signal="requests"`) or the used fraction of KV slots (`"kv"`).
Explicit per-request tiers bypass the policy entirely (the engine resolves them before admission).
"""

from __future__ import annotations

from collections.abc import Callable

from .api import PolicySpec


class TierPolicy:
    """Stateful evaluation of a PolicySpec; `update(load)` returns the current auto tier."""

    def __init__(self, spec: PolicySpec, resolve: Callable[[str], str | None]) -> None:
        """`resolve` maps a tier request to a tier name (raising UnknownTierError), e.g. ElasticModel.resolve."""
        self.spec = validate_policy(spec, resolve)
        self.level = 0

    @property
    def tier(self) -> str:
        return self.spec.default_tier if self.level == 0 else self.spec.ladder[self.level - 1][1]

    def update(self, load: float) -> str:
        """Move along the ladder for the current load (at most to the level it supports) and return the tier."""
        if self.spec.mode == "fixed":
            return self.spec.default_tier
        ladder = self.spec.ladder
        while self.level < len(ladder) and load >= ladder[self.level][0]:
            self.level += 1
        while self.level > 0 and load < ladder[self.level - 1][0] - self.spec.hysteresis:
            self.level -= 1
        return self.tier


def validate_policy(spec: PolicySpec, resolve: Callable[[str], str | None]) -> PolicySpec:
    """Check a PolicySpec; return it with tier requests replaced by canonical names. ValueError names the field."""
    if spec.mode not in ("fixed", "load"):
        raise ValueError(f"policy mode must be 'fixed' or 'load', got {spec.mode!r}")
    if spec.signal not in ("requests", "kv"):
        raise ValueError(f"policy signal must be 'requests' or 'kv', got {spec.signal!r}")
    if spec.hysteresis < 0:
        raise ValueError(f"policy hysteresis must be >= 0, got {spec.hysteresis!r}")
    default = resolve(spec.default_tier)
    if default is None:
        raise ValueError("policy default_tier must be a tier, not 'auto'")
    ladder = []
    for threshold, tier in spec.ladder:
        name = resolve(tier)
        if name is None:
            raise ValueError(f"policy ladder tier must be a tier, not {tier!r}")
        if spec.signal == "kv" and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"policy ladder threshold {threshold!r} is outside [0, 1] (signal 'kv')")
        if ladder and threshold <= ladder[-1][0]:
            raise ValueError(f"policy ladder thresholds must increase; {threshold!r} follows {ladder[-1][0]!r}")
        ladder.append((float(threshold), name))
    if spec.mode == "load" and not ladder:
        raise ValueError("policy mode 'load' needs a non-empty ladder")
    return PolicySpec(mode=spec.mode, default_tier=default, ladder=tuple(ladder), signal=spec.signal,
                      hysteresis=float(spec.hysteresis))
