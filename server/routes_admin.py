"""Operations routes: `GET|PUT /admin/tier` (bearer token), `GET /health`, `GET /metrics`."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from sparsedial.engine.api import EngineProtocol, PolicySpec

from .deps import ServerState, bearer_matches, get_engine, get_state, resolve_tier
from .errors import APIError, public_reason
from .metrics import CONTENT_TYPE
from .protocol import ErrorResponse, HealthResponse, LadderStep, PolicyOut, TierState, TierUpdate

router = APIRouter()


def require_admin(request: Request, state: ServerState = Depends(get_state)) -> None:
    """403 when no admin token is configured; 401 unless `Authorization: Bearer <token>` matches it (compared
    in constant time)."""
    token = state.settings.admin_token
    if token is None:
        raise APIError(403, "admin routes are disabled: set SPARSEDIAL_ADMIN_TOKEN to enable them",
                       code="admin_disabled")
    if not bearer_matches(request, token):
        raise APIError(401, "missing or invalid admin token (send 'Authorization: Bearer <token>')",
                       code="invalid_token", headers={"WWW-Authenticate": "Bearer"})


def tier_state(engine: EngineProtocol) -> TierState:
    p = engine.get_policy()
    policy = PolicyOut(mode=p.mode, default_tier=p.default_tier, signal=p.signal, hysteresis=p.hysteresis,
                       ladder=[LadderStep(threshold=t, tier=name) for t, name in p.ladder])
    return TierState(default_tier=p.default_tier, policy=policy, current_auto_tier=engine.stats().current_auto_tier,
                     tiers=list(engine.tiers))


def _named_tier(engine: EngineProtocol, value: str, param: str) -> str:
    tier = resolve_tier(engine, value, param=param)
    if tier is None:
        raise APIError(400, f"{param} must name a tier ({', '.join(engine.tiers)}), not 'auto'", param=param,
                       code="unknown_tier")
    return tier.name


def updated_policy(engine: EngineProtocol, body: TierUpdate) -> PolicySpec:
    cur = engine.get_policy()
    default = _named_tier(engine, body.default_tier, "default_tier") if body.default_tier else cur.default_tier
    ladder = cur.ladder
    if body.ladder is not None:
        ladder = tuple(sorted((s.threshold, _named_tier(engine, s.tier, "ladder")) for s in body.ladder))
    mode = body.mode or cur.mode
    if mode == "load" and not ladder:
        raise APIError(400, "mode 'load' needs a non-empty ladder of {threshold, tier} steps", param="ladder",
                       code="invalid_policy")
    signal = body.signal or cur.signal
    if signal == "kv" and any(t > 1.0 for t, _ in ladder):
        raise APIError(400, "with signal 'kv' ladder thresholds are KV use in [0, 1]", param="ladder",
                       code="invalid_policy")
    hysteresis = cur.hysteresis if body.hysteresis is None else body.hysteresis
    return PolicySpec(mode=mode, default_tier=default, ladder=ladder, signal=signal, hysteresis=hysteresis)


ADMIN_ERRORS = {c: {"model": ErrorResponse} for c in (400, 401, 403, 503)}


@router.get("/admin/tier", response_model=TierState, responses=ADMIN_ERRORS, dependencies=[Depends(require_admin)])
async def get_tier(engine: EngineProtocol = Depends(get_engine)) -> TierState:
    """The default tier, the policy and the tier `auto` maps to right now."""
    return tier_state(engine)


@router.put("/admin/tier", response_model=TierState, responses=ADMIN_ERRORS, dependencies=[Depends(require_admin)])
async def put_tier(body: TierUpdate, engine: EngineProtocol = Depends(get_engine)) -> TierState:
    """Change the default tier and/or policy. Requests already admitted keep their tier."""
    try:
        engine.set_policy(updated_policy(engine, body))
    except ValueError as exc:  # the engine's own policy checks (e.g. duplicate ladder thresholds)
        raise APIError(400, str(exc), param="ladder" if "ladder" in str(exc) else None,
                       code="invalid_policy") from exc
    return tier_state(engine)


@router.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
async def health(state: ServerState = Depends(get_state)):
    """200 once the engine is loaded; 503 while it loads or if it failed to."""
    engine = state.engine
    failed = getattr(engine, "error", None)  # the engine's loop died (not one request): not healthy
    if engine is None or failed is not None:
        status = "failed" if state.load_error or failed is not None else "loading"
        detail = state.load_error or (f"the engine loop failed: {public_reason(failed)}" if failed else None)
        body = HealthResponse(status=status, detail=detail)
        return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": "1"})
    return HealthResponse(status="ok", model=state.model_id(engine), tiers=list(engine.tiers))


@router.get("/metrics", response_class=Response)
async def metrics(state: ServerState = Depends(get_state)) -> Response:
    """Prometheus text format."""
    if state.engine is not None:
        state.metrics.refresh(state.engine)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)
