"""One engine replica of the fleet: the unchanged server app (server/app.py's `create_app`) over a `FleetEngine`,
plus three routes put in front of the app's own:

- `PUT /admin/tier`: the new policy goes to the fleet controller, and the reply waits (up to 5 s) until every
  live replica has applied it (header `x-sparsedial-replicas-applied: k/n`).
- `GET /admin/fleet` (admin token): the controller's view: policy version, fleet load and tier, each replica.
- `GET /metrics`: every replica's series with a `replica` label (each replica sends its text to the controller
  every second), plus `sparsedial_fleet_*` gauges.

`FleetEngine` is the replica's AsyncEngine as the routes see it: `get_policy()` is the operator's (fleet)
policy, `stats().current_auto_tier` the fleet's auto tier; the engine itself runs a fixed policy at the fleet
tier, so an `auto` request takes the fleet tier of the moment it is admitted, and its FinishEvent (hence the
response's `tier`) names it. Nothing here imports ray: the controller is anything with the async methods of
`Controller` (app.py adapts a Serve handle).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from dataclasses import replace
from typing import Any, Protocol

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from sparsedial.engine.api import EngineStats, PolicySpec
from sparsedial.engine.policy import TierPolicy
from sparsedial.server import create_app
from sparsedial.server.deps import get_engine, get_state
from sparsedial.server.errors import APIError
from sparsedial.server.metrics import CONTENT_TYPE
from sparsedial.server.protocol import ErrorResponse, TierState, TierUpdate
from sparsedial.server.routes_admin import require_admin, tier_state, updated_policy

from .fleet import spec_from_dict, spec_to_dict

log = logging.getLogger("sparsedial.deploy")
METRICS_EVERY_S = 1.0


class Controller(Protocol):
    async def report(self, report: dict[str, Any], proposed: dict[str, Any] | None, version: int) -> dict: ...

    async def set_policy(self, spec: dict[str, Any]) -> dict: ...

    async def wait_applied(self, version: int, timeout_s: float) -> tuple[int, int]: ...

    async def snapshot(self, with_metrics: bool = False) -> dict: ...


class FleetEngine:
    """EngineProtocol over a replica's engine, with the fleet's policy (see the module docstring)."""

    def __init__(self, engine: Any, initial: PolicySpec, replica_id: str) -> None:
        self.engine, self.replica_id = engine, replica_id
        self.operator = TierPolicy(initial, engine.resolve_tier).spec  # canonical names
        self.version = 0  # the controller's policy version applied here (0: none yet)
        self.fleet_tier = self.operator.default_tier
        self.fleet_load = 0.0
        self.fleet_replicas = 1
        self.last_reply = 0.0  # monotonic time of the controller's last answer
        self._set_local(self.fleet_tier)
        self._task: asyncio.Task | None = None
        self._metrics_sent = 0.0

    # ------------------------------------------------------------------ EngineProtocol (delegated)
    def __getattr__(self, name: str) -> Any:  # model_name, tiers, max_context, tokenizer, error, abort...
        return getattr(self.engine, name)

    def resolve_tier(self, requested):
        return self.engine.resolve_tier(requested)

    def submit(self, prompt, params, tier=None, request_id=None):
        return self.engine.submit(prompt, params, tier, request_id=request_id)

    async def prompt_logprobs(self, prompt, tier=None, top: int = 0):
        return await self.engine.prompt_logprobs(prompt, tier, top)

    def get_policy(self) -> PolicySpec:
        return self.operator

    def set_policy(self, policy: PolicySpec) -> None:
        """Local only (create_app's default tier, before the controller answers); the fleet's PUT /admin/tier
        goes through the controller instead."""
        self.operator = TierPolicy(policy, self.engine.resolve_tier).spec
        if self.version == 0:
            self._set_local(self.operator.default_tier)
            self.fleet_tier = self.operator.default_tier

    def stats(self) -> EngineStats:
        return replace(self.engine.stats(), current_auto_tier=self.fleet_tier)

    # ------------------------------------------------------------------ fleet
    def _set_local(self, tier: str) -> None:
        self.engine.set_policy(PolicySpec(mode="fixed", default_tier=tier))

    def apply(self, reply: dict[str, Any]) -> None:
        """Take the controller's policy (when newer) and fleet tier."""
        self.last_reply = time.monotonic()
        if reply.get("policy") is not None and reply["version"] > self.version:
            self.operator = spec_from_dict(reply["policy"])
            self.version = reply["version"]
        tier = reply.get("tier")
        if tier and tier != self.fleet_tier:
            try:
                self._set_local(tier)
                self.fleet_tier = tier
            except ValueError as exc:  # a tier this replica's model does not serve (a mixed rollout)
                log.error("fleet tier %r not applied: %s", tier, exc)
        self.fleet_load, self.fleet_replicas = reply.get("load", 0.0), reply.get("replicas", 1)

    def report(self, metrics_text: str | None = None) -> dict[str, Any]:
        s = self.engine.stats()
        return {"replica": self.replica_id, "pid": os.getpid(), "running": s.running, "waiting": s.waiting,
                "kv_used": s.kv_slots_used, "kv_total": s.kv_slots_total, "version": self.version,
                "tier": self.fleet_tier, "metrics": metrics_text}

    async def tick(self, controller: Controller, metrics_fn=None) -> None:
        now = time.monotonic()
        text = None
        if metrics_fn is not None and now - self._metrics_sent >= METRICS_EVERY_S:
            text, self._metrics_sent = metrics_fn(), now
        reply = await controller.report(self.report(text), spec_to_dict(self.operator), self.version)
        self.apply(reply)

    def start(self, controller: Controller, tick_s: float, metrics_fn=None) -> None:
        async def loop() -> None:
            failures = 0
            while True:
                try:
                    await self.tick(controller, metrics_fn)
                    failures = 0
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the controller restarts; keep serving meanwhile
                    failures += 1
                    if failures in (1, 10) or failures % 100 == 0:
                        log.warning("fleet controller unreachable (%d tries): %s", failures, exc)
                await asyncio.sleep(tick_s)

        self._task = asyncio.get_running_loop().create_task(loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


# ----------------------------------------------------------------------------------------------- metrics
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?( .*)$")


def merge_metrics(texts: dict[str, str], fleet: dict[str, Any]) -> str:
    """The replicas' Prometheus texts as one exposition: each metric family once (HELP/TYPE from the first
    replica having it), every sample with a `replica` label; then the fleet gauges."""
    families: dict[str, tuple[list[str], list[str]]] = {}
    order: list[str] = []
    for replica, text in sorted(texts.items()):
        current = None
        label = 'replica="' + replica.replace("\\", "\\\\").replace('"', '\\"') + '"'
        for line in text.splitlines():
            if line.startswith(("# HELP ", "# TYPE ")):
                name = line.split(" ", 3)[2]
                current = name
                if name not in families:
                    families[name] = ([], [])
                    order.append(name)
                head = families[name][0]
                if len(head) < 2 and line not in head:
                    head.append(line)
                continue
            m = _SAMPLE.match(line)
            if not m or current is None:
                continue
            labels = m.group(2)
            labels = "{" + label + ("," + labels[1:] if labels and labels != "{}" else "}")
            families[current][1].append(f"{m.group(1)}{labels}{m.group(3)}")
    out = []
    for name in order:
        head, samples = families[name]
        out += head + samples
    out += ["# HELP sparsedial_fleet_replicas Live engine replicas (reported within stale_s).",
            "# TYPE sparsedial_fleet_replicas gauge", f"sparsedial_fleet_replicas {fleet.get('replicas', 0)}",
            "# HELP sparsedial_fleet_load Fleet load the tier policy reads (waiting + running, or KV use).",
            "# TYPE sparsedial_fleet_load gauge", f"sparsedial_fleet_load {float(fleet.get('load', 0.0))}",
            "# HELP sparsedial_fleet_policy_version Version of the operator's policy.",
            "# TYPE sparsedial_fleet_policy_version gauge",
            f"sparsedial_fleet_policy_version {fleet.get('version', 0)}",
            "# HELP sparsedial_fleet_auto_tier 1 for the tier auto requests get now, fleet-wide.",
            "# TYPE sparsedial_fleet_auto_tier gauge"]
    if fleet.get("tier"):
        out.append(f'sparsedial_fleet_auto_tier{{tier="{fleet["tier"]}"}} 1.0')
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------- the app
REPLICA_HEADER = "x-sparsedial-replica"


class ReplicaHeader:
    """Pure ASGI middleware: every HTTP response says which replica answered (`x-sparsedial-replica: <id>`)."""

    def __init__(self, app: Any, replica_id: str) -> None:
        self.app, self.header = app, (REPLICA_HEADER.encode(), replica_id.encode())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_replica(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), self.header]
            await send(message)

        await self.app(scope, receive, send_with_replica)


def build_replica_app(settings: Any, fleet: FleetEngine, controller: Controller):
    """create_app(settings, engine=fleet) with the fleet's admin and metrics routes in front of its own, and the
    replica's id in a header of every response."""
    app = create_app(settings, engine=fleet)
    app.add_middleware(ReplicaHeader, replica_id=fleet.replica_id)
    router = APIRouter()
    errors = {c: {"model": ErrorResponse} for c in (400, 401, 403, 503)}

    @router.put("/admin/tier", response_model=TierState, responses=errors, dependencies=[Depends(require_admin)])
    async def put_tier(body: TierUpdate, engine: FleetEngine = Depends(get_engine)):
        """Change the fleet's default tier and/or policy; answers once every live replica applied it."""
        spec = updated_policy(engine, body)
        try:
            spec = TierPolicy(spec, engine.resolve_tier).spec
        except ValueError as exc:
            raise APIError(400, str(exc), param="ladder" if "ladder" in str(exc) else None,
                           code="invalid_policy") from exc
        try:
            reply = await controller.set_policy(spec_to_dict(spec))
            engine.apply(reply)
            done, live = await controller.wait_applied(reply["version"], 5.0)
        except APIError:
            raise
        except Exception as exc:
            raise APIError(503, f"fleet controller unavailable: {exc}", code="not_ready",
                           headers={"Retry-After": "1"}) from exc
        body_out = tier_state(engine).model_dump(mode="json")
        return JSONResponse(body_out, headers={"x-sparsedial-replicas-applied": f"{done}/{live}",
                                               "x-sparsedial-policy-version": str(reply["version"])})

    @router.get("/admin/fleet", dependencies=[Depends(require_admin)])
    async def fleet_view() -> dict:
        """The controller's view: policy version, fleet load and auto tier, each live replica's report."""
        snap = await controller.snapshot(False)
        snap["answered_by"] = fleet.replica_id
        return snap

    @router.get("/metrics", response_class=Response)
    async def metrics(request: Request) -> Response:
        """Every replica's series (label `replica`) and the sparsedial_fleet_* gauges, Prometheus text."""
        own = local_metrics(get_state(request))
        try:
            snap = await controller.snapshot(True)
        except Exception:  # noqa: BLE001 - the controller is restarting: this replica's series alone
            snap = {"metrics": {}, "replicas": 1, "load": fleet.fleet_load, "tier": fleet.fleet_tier,
                    "version": fleet.version}
        texts = dict(snap.get("metrics") or {})
        texts[fleet.replica_id] = own  # this replica's own text is fresh
        return Response(merge_metrics(texts, snap), media_type=CONTENT_TYPE)

    n = len(router.routes)
    app.include_router(router)
    added = app.router.routes[-n:]
    del app.router.routes[-n:]
    app.router.routes[0:0] = added  # matched before the app's own /admin/tier and /metrics
    return app


def local_metrics(state: Any) -> str:
    if state.engine is not None:
        state.metrics.refresh(state.engine)
    return state.metrics.render().decode()
