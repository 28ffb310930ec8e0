"""The fleet's tier policy, in one place: `FleetState` (plain Python, no ray) holds the operator's policy and
the latest load report of every replica; the `auto` tier is engine/policy.py's `TierPolicy` evaluated on the
fleet's load (waiting + running summed over the live replicas, or the fleet's used fraction of KV slots for
signal "kv"), so its ladder and hysteresis mean what they mean on one server, for the whole fleet.

The Serve deployment `FleetController` (app.py) wraps one FleetState. Each replica reports every `tick_s`
and gets back the policy version and the fleet tier, which it applies to its own engine (replica.py). A
replica silent for `stale_s` (dead, restarting) drops out of the load.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sparsedial.engine.api import PolicySpec
from sparsedial.engine.options import LoadSignal
from sparsedial.engine.policy import TierPolicy


@dataclass(frozen=True)
class _Named:
    """A tier by its canonical name: the replicas validated the policy against the model already."""

    name: str


def _named(requested: object) -> _Named | None:
    if requested is None or requested == "auto":
        return None
    return _Named(str(requested))


def spec_to_dict(spec: PolicySpec) -> dict[str, Any]:
    return {"mode": str(spec.mode), "default_tier": spec.default_tier, "ladder": [[t, n] for t, n in spec.ladder],
            "signal": str(spec.signal), "hysteresis": spec.hysteresis}


def spec_from_dict(d: dict[str, Any]) -> PolicySpec:
    return PolicySpec(mode=d["mode"], default_tier=d["default_tier"],
                      ladder=tuple((float(t), str(n)) for t, n in d["ladder"]), signal=d["signal"],
                      hysteresis=float(d["hysteresis"]))


@dataclass
class Report:
    """One replica's last report."""

    replica: str  # Serve's replica id
    pid: int
    running: int
    waiting: int
    kv_used: int
    kv_total: int
    version: int  # the policy version it has applied
    tier: str  # the auto tier its engine serves now
    seen: float = 0.0  # monotonic time received
    metrics: str | None = None  # its Prometheus text (sent every few ticks), for the fleet's /metrics

    def public(self, now: float) -> dict[str, Any]:
        return {"replica": self.replica, "pid": self.pid, "running": self.running, "waiting": self.waiting,
                "kv_slots_used": self.kv_used, "kv_slots_total": self.kv_total, "policy_version": self.version,
                "auto_tier": self.tier, "age_s": round(now - self.seen, 3)}


class FleetState:
    """The operator's policy (versioned) and the fleet's auto tier."""

    def __init__(self, stale_s: float = 2.0, clock=time.monotonic) -> None:
        self.stale_s, self.clock = stale_s, clock
        self.version = 0  # 0: no policy yet; the first replica proposes the deployment's initial one
        self.spec: PolicySpec | None = None
        self.policy: TierPolicy | None = None
        self.reports: dict[str, Report] = {}

    # ------------------------------------------------------------------------------------------ policy
    def set_policy(self, spec: PolicySpec, version: int | None = None) -> int:
        """Adopt `spec` (tier names already canonical); a new version unless `version` is given."""
        policy = TierPolicy(spec, _named)  # validates (ValueError) before anything changes
        self.spec, self.policy = policy.spec, policy
        self.version = self.version + 1 if version is None else version
        return self.version

    def live(self) -> list[Report]:
        now = self.clock()
        return [r for r in self.reports.values() if now - r.seen <= self.stale_s]

    def load(self) -> float:
        live = self.live()
        if self.spec is not None and self.spec.signal is LoadSignal.KV:
            total = sum(r.kv_total for r in live)
            return sum(r.kv_used for r in live) / total if total else 0.0
        return float(sum(r.running + r.waiting for r in live))

    def tier(self) -> str | None:
        """The fleet's auto tier now (moves along the ladder for the current fleet load)."""
        if self.policy is None:
            return None
        return self.policy.update(self.load()).name

    # ---------------------------------------------------------------------------------------- replicas
    def report(self, r: Report, proposed: PolicySpec | None = None, proposed_version: int = 0) -> dict[str, Any]:
        """Record a replica's load; adopt its policy when it knows a newer one than this state (first start,
        or this controller restarted and lost its state); return what the replica must apply."""
        r.seen = self.clock()
        old = self.reports.get(r.replica)
        if r.metrics is None and old is not None:
            r.metrics = old.metrics
        self.reports[r.replica] = r
        if proposed is not None and (self.spec is None or proposed_version > self.version):
            self.set_policy(proposed, version=max(proposed_version, 1))
        return self.reply()

    def reply(self) -> dict[str, Any]:
        tier = self.tier()
        return {"version": self.version, "policy": None if self.spec is None else spec_to_dict(self.spec),
                "tier": tier, "load": self.load(), "replicas": len(self.live())}

    def applied(self, version: int) -> tuple[int, int]:
        """(live replicas that applied `version` or newer, live replicas)."""
        live = self.live()
        return sum(r.version >= version for r in live), len(live)

    def snapshot(self, with_metrics: bool = False) -> dict[str, Any]:
        now = self.clock()
        out = self.reply()
        out["replica_reports"] = [r.public(now) for r in sorted(self.live(), key=lambda r: r.replica)]
        if with_metrics:
            out["metrics"] = {r.replica: r.metrics for r in self.live() if r.metrics}
        return out
