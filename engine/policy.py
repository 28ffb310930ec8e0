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
from .options import LoadSignal, PolicyMode, parse
from .tiers import TierSpec

Resolve = Callable[[object], TierSpec | None]


class TierPolicy:
    """Stateful evaluation of a PolicySpec; `update(load)` returns the current auto tier."""

    def __init__(self, spec: PolicySpec, resolve: Resolve) -> None:
        """`resolve` maps a tier request to a TierSpec (raising UnknownTierError), e.g. ElasticModel.resolve."""
        self.spec, self._tiers = _validated(spec, resolve)  # _tiers[level]: the tier of each ladder level
        self.level = 0

    @property
    def tier(self) -> TierSpec:
        """The tier an auto request admitted now gets."""
        return self._tiers[self.level]  # type: ignore[return-value]

    def update(self, load: float) -> TierSpec:
        """Move along the ladder for the current load (at most to the level it supports) and return the tier."""
        if self.spec.mode is PolicyMode.FIXED:
            return self.tier
        ladder = self.spec.ladder
        while self.level < len(ladder) and load >= ladder[self.level][0]:
            self.level += 1
        while self.level > 0 and load < ladder[self.level - 1][0] - self.spec.hysteresis:
            self.level -= 1
        return self.tier


def validate_policy(spec: PolicySpec, resolve: Resolve) -> PolicySpec:
    """Check a PolicySpec; return it with enums for its modes and tier requests replaced by canonical names.
    ValueError names the field."""
    return _validated(spec, resolve)[0]


def _validated(spec: PolicySpec, resolve: Resolve) -> tuple[PolicySpec, list[TierSpec]]:
    """validate_policy, plus the resolved tier of each level (default first, then the ladder's)."""
    mode = parse(PolicyMode, spec.mode, "policy mode")
    signal = parse(LoadSignal, spec.signal, "policy signal")
    if spec.hysteresis < 0:
        raise ValueError(f"policy hysteresis must be >= 0, got {spec.hysteresis!r}")
    default = resolve(spec.default_tier)
    if default is None:
        raise ValueError("policy default_tier must be a tier, not 'auto'")
    ladder, tiers = [], [default]
    for threshold, tier in spec.ladder:
        name = resolve(tier)
        if name is None:
            raise ValueError(f"policy ladder tier must be a tier, not {tier!r}")
        if signal is LoadSignal.KV and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"policy ladder threshold {threshold!r} is outside [0, 1] (signal 'kv')")
        if ladder and threshold <= ladder[-1][0]:
            raise ValueError(f"policy ladder thresholds must increase; {threshold!r} follows {ladder[-1][0]!r}")
        ladder.append((float(threshold), name.name))
        tiers.append(name)
    if mode is PolicyMode.LOAD and not ladder:
        raise ValueError("policy mode 'load' needs a non-empty ladder")
    return PolicySpec(mode=mode, default_tier=default.name, ladder=tuple(ladder), signal=signal,
                      hysteresis=float(spec.hysteresis)), tiers
