"""The fleet's options (`FleetOptions`), ray-free and torch-free: the CLI, the Serve app builder and the KubeRay
config all build one. Server settings (model, admin token, limits...) stay `ServerSettings`' own: `server`
holds the overrides that every replica builds its `ServerSettings` from (env vars still apply on top, as for
`sparsedial serve`).
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from sparsedial.errors import SparsedialError

INSTALL_HINT = "pip install 'sparsedial[ray]'"


class RayMissingError(SparsedialError):
    """ray[serve] is not installed."""


def require_ray() -> None:
    """Raise RayMissingError (one line, with the install command) unless `ray.serve` can be imported."""
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        raise RayMissingError(f"scale-out needs Ray Serve, which is not installed: {INSTALL_HINT}")
    try:
        import ray.serve  # noqa: F401  (serve's own dependencies: fastapi, starlette, aiohttp...)
    except ImportError as exc:
        raise RayMissingError(f"Ray Serve does not import ({exc}): {INSTALL_HINT}") from None


def parse_ladder(text: str | None) -> tuple[tuple[float, str], ...]:
    """`"8=50%,16=2:4"` -> ((8.0, "50%"), (16.0, "2:4")): fleet load threshold = tier, comma separated."""
    if not text:
        return ()
    steps = []
    for part in text.split(","):
        threshold, sep, tier = part.strip().partition("=")
        if not sep or not tier.strip():
            raise ValueError(f"ladder step {part.strip()!r} must be THRESHOLD=TIER, e.g. 8=50%")
        try:
            steps.append((float(threshold), tier.strip()))
        except ValueError:
            raise ValueError(f"ladder threshold {threshold!r} is not a number") from None
    return tuple(steps)


@dataclass
class FleetOptions:
    """How the Ray Serve application runs the engine replicas (defaults: 2 fixed replicas)."""

    replicas: int = 2  # fixed replica count (ignored when autoscaling: min_replicas / max_replicas)
    autoscale: bool = False
    min_replicas: int = 1
    max_replicas: int = 4
    initial_replicas: int | None = None
    target_ongoing_requests: float = 8.0  # Serve's autoscaling target per replica
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 30.0
    # Serve's per-replica cap on requests handed to a replica; beyond it they queue in Serve's router, where
    # the engine's (and the fleet policy's) load does not see them, so keep it >= max_running.
    max_ongoing_requests: int = 64
    replica_cpus: float = 1.0  # Ray logical CPUs each replica reserves
    torch_threads: int = 1  # OMP_NUM_THREADS / torch intra-op threads per replica
    # the fleet tier policy: None keeps the replicas' default (fixed at the default tier); a ladder of
    # (fleet load threshold, tier) steps turns mode "load" on
    ladder: tuple[tuple[float, str], ...] = ()
    signal: str = "requests"
    hysteresis: float = 0.0
    tick_s: float = 0.1  # how often each replica reports its load and picks up the fleet tier
    stale_s: float = 2.0  # a replica silent this long no longer counts in the fleet's load
    server: dict[str, Any] = field(default_factory=dict)  # ServerSettings overrides (model, admin_token...)

    def __post_init__(self) -> None:
        self.ladder = tuple((float(t), str(n)) for t, n in self.ladder)
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.autoscale and not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 0 <= min_replicas <= max_replicas, got {self.min_replicas}, {self.max_replicas}")
        if self.tick_s <= 0 or self.stale_s <= self.tick_s:
            raise ValueError("need tick_s > 0 and stale_s > tick_s")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ladder"] = [list(s) for s in self.ladder]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FleetOptions:
        """From a Serve config's `args` (unknown keys are an error; `ladder` may be a list or "8=50%,...")."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown fleet option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        d = dict(d)
        if isinstance(d.get("ladder"), str):
            d["ladder"] = parse_ladder(d["ladder"])
        return cls(**d)

    def deployment_options(self) -> dict[str, Any]:
        """`serve.deployment(...).options(**this)` for the engine replicas."""
        opts: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": self.replica_cpus,
                                  "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(self.torch_threads),
                                                               "MKL_NUM_THREADS": str(self.torch_threads)}}},
            "health_check_period_s": 2.0,
            "health_check_timeout_s": 10.0,
            "graceful_shutdown_timeout_s": 5.0,
            "logging_config": {"log_level": "WARNING", "enable_access_log": False},
        }
        if self.autoscale:
            cfg = {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                   "target_ongoing_requests": self.target_ongoing_requests,
                   "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s}
            if self.initial_replicas is not None:
                cfg["initial_replicas"] = self.initial_replicas
            opts["autoscaling_config"] = cfg
        else:
            opts["num_replicas"] = self.replicas
        return opts
