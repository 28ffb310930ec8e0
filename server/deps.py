"""Per-app state and the dependencies routes use: the engine (503 until loaded), tier resolution from the
`sparsity` field and the model id, and SamplingParams built with HTTP errors."""

from __future__ import annotations

import asyncio
import hmac
import uuid
from dataclasses import dataclass

from fastapi import Request
from pydantic import SecretStr
from sparsedial.engine.api import EngineProtocol, TierRequest, UnknownTierError
from sparsedial.engine.sampling import SamplingParams
from sparsedial.engine.tiers import TierSpec

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


def bearer_matches(request: Request, secret: SecretStr) -> bool:
    """True when the request carries `Authorization: Bearer <secret>` (compared in constant time)."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    expected = secret.get_secret_value().encode()
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected)


def require_api_key(request: Request) -> None:
    """401 unless the bearer token is the configured API key; nothing to check when no key is configured."""
    key = get_state(request).settings.api_key
    if key is not None and not bearer_matches(request, key):
        raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


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


def resolve_tier(engine: EngineProtocol, requested: TierRequest, param: str = "sparsity") -> TierSpec | None:
    """The tier a request names (resolved once, here: the engine checks it without parsing it again), or None
    for auto; 400 listing the tiers when unknown."""
    try:
        return engine.resolve_tier(requested)
    except UnknownTierError as exc:
        raise APIError(400, str(exc), param=param, code="unknown_tier") from exc


def model_ids(state: ServerState, engine: EngineProtocol) -> list[str]:
    name = state.model_id(engine)
    return [name] + [f"{name}@{t}" for t in engine.tiers]


def request_tier(state: ServerState, engine: EngineProtocol, model: str, sparsity: TierRequest) -> TierSpec | None:
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


def sampling_params(settings: ServerSettings, **fields: object) -> SamplingParams:
    """SamplingParams from request fields, within the server's input limits; ValueError (naming the field)
    becomes a 400."""
    stop = fields.pop("stop", None)
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())  # type: ignore[arg-type]
    if len(stops) > settings.max_stop_sequences:
        raise APIError(400, f"stop has {len(stops)} strings; this server accepts at most "
                            f"{settings.max_stop_sequences}", param="stop", code="invalid_value")
    longest = max((len(x) for x in stops), default=0)
    if longest > settings.max_stop_length:
        raise APIError(400, f"a stop string has {longest} characters; this server accepts at most "
                            f"{settings.max_stop_length}", param="stop", code="invalid_value")
    check_logprobs(settings, fields.get("logprobs"))  # type: ignore[arg-type]
    try:
        return SamplingParams(stop=stops, **fields)  # type: ignore[arg-type]
    except ValueError as exc:
        raise APIError(400, str(exc), code="invalid_value") from exc


def check_logprobs(settings: ServerSettings, value: int | None, param: str = "logprobs") -> None:
    """400 when more top alternatives per token are asked for than `max_logprobs`."""
    if value is not None and value > settings.max_logprobs:
        raise APIError(400, f"{param} {value} is above this server's limit of {settings.max_logprobs}",
                       param=param, code="invalid_value")


def check_n(settings: ServerSettings, n: int) -> None:
    if n > settings.max_n:
        raise APIError(400, f"n {n} is above this server's limit of {settings.max_n}", param="n",
                       code="invalid_value")


async def tokenize(engine: EngineProtocol, settings: ServerSettings, prompt: str | list[int],
                   add_special_tokens: bool = False) -> list[int]:
    """A prompt's token ids, computed in a worker thread (a long prompt must not stall the event loop and,
    with it, every other request), within `max_prompt_tokens`."""
    if isinstance(prompt, str):
        encode = engine.tokenizer.encode  # type: ignore[attr-defined]
        ids = await asyncio.to_thread(encode, prompt, add_special_tokens=add_special_tokens)
    else:
        ids = list(prompt)
    limit = settings.max_prompt_tokens
    if limit is not None and len(ids) > limit:
        raise APIError(400, f"prompt has {len(ids)} tokens; this server accepts at most {limit}",
                       param="prompt", code="context_length_exceeded")
    return ids
