"""The two Serve deployments (imports ray: import this module only after `require_ray()`).

- `FleetController`: one replica holding the fleet's `FleetState` (fleet.py): the operator's policy and the
  replicas' load reports; no HTTP route of its own, no CPU reserved.
- `EngineReplica`: the HTTP ingress; each replica loads the engine on the same checkpoint and serves the
  unchanged server app (`@serve.ingress()` with the app built at replica start: replica.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ray import serve

from sparsedial.engine.api import PolicySpec

from .fleet import FleetState, Report, spec_from_dict
from .options import FleetOptions
from .replica import FleetEngine, build_replica_app, local_metrics

log = logging.getLogger("sparsedial.deploy")


@serve.deployment(name="FleetController", num_replicas=1, max_ongoing_requests=10_000,
                  ray_actor_options={"num_cpus": 0},
                  logging_config={"log_level": "WARNING", "enable_access_log": False})
class FleetController:
    def __init__(self, stale_s: float = 2.0) -> None:
        self.state = FleetState(stale_s)

    async def report(self, report: dict[str, Any], proposed: dict[str, Any] | None, version: int) -> dict:
        return self.state.report(Report(**report), spec_from_dict(proposed) if proposed else None, version)

    async def set_policy(self, spec: dict[str, Any]) -> dict:
        self.state.set_policy(spec_from_dict(spec))
        return self.state.reply()

    async def wait_applied(self, version: int, timeout_s: float) -> tuple[int, int]:
        deadline = time.monotonic() + timeout_s
        while True:
            done, live = self.state.applied(version)
            if done >= live or time.monotonic() > deadline:
                return done, live
            await asyncio.sleep(0.02)

    async def snapshot(self, with_metrics: bool = False) -> dict:
        return self.state.snapshot(with_metrics)


class _HandleController:
    """replica.Controller over a Serve DeploymentHandle of FleetController."""

    def __init__(self, handle: Any) -> None:
        self.h = handle

    async def report(self, report, proposed, version):
        return await self.h.report.remote(report, proposed, version)

    async def set_policy(self, spec):
        return await self.h.set_policy.remote(spec)

    async def wait_applied(self, version, timeout_s):
        return tuple(await self.h.wait_applied.remote(version, timeout_s))

    async def snapshot(self, with_metrics=False):
        return await self.h.snapshot.remote(with_metrics)


@serve.deployment(name="EngineReplica")
@serve.ingress()
class EngineReplica:
    async def __init__(self, options: dict[str, Any], controller: Any) -> None:
        import torch

        from sparsedial.server import ServerSettings
        from sparsedial.server.engine_factory import build_engine

        opts = FleetOptions.from_dict(options)
        torch.set_num_threads(opts.torch_threads)
        settings = ServerSettings(**opts.server)
        engine = await asyncio.to_thread(build_engine, settings)
        engine.start()
        default = engine.get_policy().default_tier
        if settings.default_tier is not None and engine.resolve_tier(settings.default_tier) is not None:
            default = engine.resolve_tier(settings.default_tier).name
        initial = PolicySpec(mode="load" if opts.ladder else "fixed", default_tier=default, ladder=opts.ladder,
                             signal=opts.signal, hysteresis=opts.hysteresis)
        replica_id = serve.get_replica_context().replica_id.unique_id
        self.fleet = FleetEngine(engine, initial, replica_id)
        ctl = _HandleController(controller)
        self._fastapi = build_replica_app(settings, self.fleet, ctl)
        self.fleet.start(ctl, opts.tick_s, lambda: local_metrics(self._fastapi.state.sparsedial))
        log.info("replica %s ready: %s, tiers %s", replica_id, engine.model_name, ", ".join(engine.tiers))

    def __serve_build_asgi_app__(self):
        return self._fastapi

    async def check_health(self) -> None:
        error = getattr(self.fleet.engine, "error", None)
        if error is not None:  # the engine loop died: Serve replaces this replica
            raise RuntimeError(f"engine loop failed: {type(error).__name__}: {error}")

    async def __del__(self) -> None:
        fleet = getattr(self, "fleet", None)
        if fleet is not None:
            await fleet.stop()
            await asyncio.to_thread(fleet.engine.shutdown, 5.0)
