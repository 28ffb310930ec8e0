"""Per-app state and the dependencies routes use: the engine (503 until loaded), tier resolution from the
`sparsity` field and the model id, and SamplingParams built with HTTP errors."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from fastapi import Request
from sparsedial.engine.api import EngineProtocol, TierRequest, UnknownTierError
from sparsedial.engine.sampling import SamplingParams

from .errors import APIError
from .metrics import ServerMetrics
from .settings import ServerSettings


@dataclass
class ServerState:
    """Everything one app instance owns; stored on `app.state.sparsedial` (never at module level)."""

    settings: ServerSettings
    metrics: ServerMetrics
    engine: EngineProtocol | None = None
    load_error: str | None = None
    owns_engine: bool = False

    def model_id(self, engine: EngineProtocol) -> str:
        return self.settings.served_model_name or engine.model_name


def get_state(request: Request) -> ServerState:
    return request.app.state.sparsedial


def get_engine(request: Request) -> EngineProtocol:
    """The loaded engine, or 503 (with Retry-After) while it loads or after it failed to load."""
    state = get_state(request)
    if state.engine is None:
        if state.load_error:
            raise APIError(503, f"engine failed to load: {state.load_error}", code="not_ready")
        raise APIError(503, "engine is loading; retry shortly", code="not_ready", headers={"Retry-After": "1"})
    return state.engine


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def resolve_tier(engine: EngineProtocol, requested: TierRequest, param: str = "sparsity") -> str | None:
    """A tier name, or None for auto; 400 listing the tiers when unknown."""
    try:
        return engine.resolve_tier(requested)
    except UnknownTierError as exc:
        raise APIError(400, str(exc), param=param, code="unknown_tier") from exc


def model_ids(state: ServerState, engine: EngineProtocol) -> list[str]:
    name = state.model_id(engine)
    return [name] + [f"{name}@{t}" for t in engine.tiers]


def request_tier(state: ServerState, engine: EngineProtocol, model: str, sparsity: TierRequest) -> str | None:
    """The tier from the `sparsity` field and/or a `<model>@<tier>` id; 400 when both are given and differ,
    404 for a model id this server does not serve."""
    name = state.model_id(engine)
    if model == name:
        pinned = None
    elif model.startswith(name + "@"):
        pinned = resolve_tier(engine, model[len(name) + 1:], param="model")
    else:
        raise APIError(404, f"model {model!r} not found; available: {', '.join(model_ids(state, engine))}",
                       param="model", code="model_not_found")
    if sparsity is None:
        return pinned
    tier = resolve_tier(engine, sparsity)
    if pinned is not None and tier != pinned:
        raise APIError(400, f"sparsity {sparsity!r} conflicts with the tier in model id {model!r}; give one",
                       param="sparsity", code="conflicting_tier")
    return tier


def sampling_params(**fields: object) -> SamplingParams:
    """SamplingParams from request fields; ValueError (naming the field) becomes a 400."""
    stop = fields.pop("stop", None)
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())  # type: ignore[arg-type]
    try:
        return SamplingParams(stop=stops, **fields)  # type: ignore[arg-type]
    except ValueError as exc:
        raise APIError(400, str(exc), code="invalid_value") from exc
