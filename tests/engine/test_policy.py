"""Tier policy: fixed, load ladder with hysteresis, validation."""

from __future__ import annotations

import pytest
from sparsedial.engine.api import PolicySpec, UnknownTierError
from sparsedial.engine.policy import TierPolicy
from sparsedial.engine.tiers import TierSpec

TIERS = ["dense", "30%", "50%", "2:4"]
SPECS = {t: TierSpec(t, "dense" if t == "dense" else "nm" if t == "2:4" else "unstructured", 0.0) for t in TIERS}


def resolve(t):
    if t == "auto":
        return None
    if t not in TIERS:
        raise UnknownTierError(t, TIERS)
    return SPECS[t]


class Names:
    """The policy's tier names as it moves (TierPolicy.update returns TierSpecs)."""

    def __init__(self, policy: TierPolicy) -> None:
        self.policy = policy

    def update(self, load: float) -> str:
        return self.policy.update(load).name


def test_fixed_ignores_load():
    p = Names(TierPolicy(PolicySpec(default_tier="30%"), resolve))
    assert [p.update(x) for x in (0, 100, 0)] == ["30%"] * 3


def test_load_ladder_climbs_at_thresholds_and_steps_back_with_hysteresis():
    p = Names(TierPolicy(PolicySpec(mode="load", ladder=((4, "30%"), (8, "2:4")), hysteresis=2), resolve))
    loads = [0, 3, 4, 5, 3, 2, 1, 9, 7, 6, 5, 10, 0]
    got = [p.update(x) for x in loads]
    assert got == ["dense", "dense", "30%", "30%", "30%", "30%",  # 3, 2 stay: not below 4 - 2
                   "dense",  # 1 < 2
                   "2:4", "2:4", "2:4",  # 7, 6 stay: not below 8 - 2
                   "30%",  # 5 < 6 steps down one level
                   "2:4", "dense"]  # a jump up goes straight to the level; load 0 drops to the bottom


def test_kv_signal_thresholds_are_fractions():
    p = Names(TierPolicy(PolicySpec(mode="load", signal="kv", ladder=((0.5, "50%"),), hysteresis=0.25), resolve))
    assert [p.update(x) for x in (0.25, 0.5, 0.3, 0.2)] == ["dense", "50%", "50%", "dense"]
    with pytest.raises(ValueError, match="outside"):
        TierPolicy(PolicySpec(mode="load", signal="kv", ladder=((2, "50%"),)), resolve)


@pytest.mark.parametrize("spec, err, match", [
    (PolicySpec(default_tier="80%"), UnknownTierError, "80%"),
    (PolicySpec(default_tier="auto"), ValueError, "default_tier"),
    (PolicySpec(mode="load"), ValueError, "non-empty ladder"),
    (PolicySpec(mode="load", ladder=((4, "30%"), (4, "50%"))), ValueError, "must increase"),
    (PolicySpec(mode="load", ladder=((4, "3:4"),)), UnknownTierError, "3:4"),
    (PolicySpec(hysteresis=-1), ValueError, "hysteresis"),
    (PolicySpec(mode="sometimes"), ValueError, "mode"),
])
def test_validation(spec, err, match):
    with pytest.raises(err, match=match):
        TierPolicy(spec, resolve)
