"""The app factory: `create_app(settings, engine=None)`.

With an engine given (tests, embedding) the app serves it at once and never stops it. Otherwise the
lifespan loads the engine from `settings.model` in a worker thread while the server already answers:
/health says 503 "loading" until it is ready (503 "failed" with the reason if loading fails), and the
engine is shut down with the app.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace

from fastapi import Depends, FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from sparsedial.engine.api import EngineProtocol

from sparsedial import __version__
from sparsedial.errors import SparsedialError

from .deps import ServerState, require_api_key, resolve_tier
from .errors import APIError, install_error_handlers, public_reason
from .limits import BodyLimit
from .metrics import ServerMetrics
from .serving import ClientDisconnected
from .settings import ServerSettings

log = logging.getLogger("sparsedial.server")
EngineFactory = Callable[[ServerSettings], EngineProtocol]


async def _maybe_await(value: object) -> None:
    if inspect.isawaitable(value):
        await value


async def _call_if_present(obj: object, *names: str) -> None:
    """Call the first of `names` that `obj` has (sync or async); used for engine start/stop hooks."""
    for name in names:
        fn = getattr(obj, name, None)
        if callable(fn):
            await _maybe_await(fn())
            return


def apply_default_tier(engine: EngineProtocol, tier: str | None) -> None:
    if tier is None:
        return
    resolved = resolve_tier(engine, tier, param="default_tier")
    if resolved is not None:
        engine.set_policy(replace(engine.get_policy(), default_tier=resolved.name))


async def _load(app: FastAPI, state: ServerState, factory: EngineFactory | None) -> None:
    if factory is None:
        from .engine_factory import build_engine as factory

    engine = None
    try:
        engine = await asyncio.to_thread(factory, state.settings)
        await _call_if_present(engine, "start")
        apply_default_tier(engine, state.settings.default_tier)
    except Exception as exc:
        if isinstance(exc, (SparsedialError, APIError)):  # a bad model or setting: the message says it all
            log.error("engine failed to load: %s", exc.message if isinstance(exc, APIError) else exc)
        else:
            log.exception("engine failed to load")
        state.load_error = public_reason(exc)
        if engine is not None:
            await _call_if_present(engine, "aclose", "shutdown", "stop")
        hook = getattr(app.state, "on_load_failed", None)
        if hook is not None:  # `sparsedial serve`: stop the server and exit non-zero, as vLLM and TGI do
            hook(state.load_error)
        return
    state.engine, state.owns_engine = engine, True
    state.metrics.model_name = state.model_id(engine)
    log.info("engine ready: %s, tiers %s", engine.model_name, ", ".join(engine.tiers))


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: ServerState = app.state.sparsedial
    task = None if state.engine is not None else asyncio.create_task(_load(app, state, app.state.engine_factory))
    try:
        yield
    finally:
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if state.owns_engine and state.engine is not None:
            await _call_if_present(state.engine, "aclose", "shutdown", "stop")
            state.engine = None


async def _client_gone(_: Request, __: ClientDisconnected) -> Response:
    return Response(status_code=499)  # nginx's "client closed request"; nobody reads it


def create_app(settings: ServerSettings | None = None, engine: EngineProtocol | None = None, *,
               engine_factory: EngineFactory | None = None) -> FastAPI:
    """A FastAPI app serving `engine`, or the one `engine_factory(settings)` (default: an AsyncEngine on
    `settings.model`) builds in a worker thread during the lifespan."""
    from .routes_admin import router as admin_router
    from .routes_docs import router as docs_router
    from .routes_generate import router as generate_router
    from .routes_openai import router as openai_router
    from .routes_playground import router as playground_router
    from .routes_tokens import router as tokens_router

    settings = settings or ServerSettings()
    # docs_url/redoc_url off: their pages load scripts from a CDN (blank offline); routes_docs serves /docs
    app = FastAPI(title="sparsedial", version=__version__, lifespan=_lifespan, docs_url=None, redoc_url=None,
                  description="Serve one elastic sparse LLM at many sparsity tiers.")
    app.add_middleware(BodyLimit, max_body_bytes=settings.max_body_bytes)
    state = ServerState(settings=settings, metrics=ServerMetrics(), engine=engine)
    if engine is not None:
        state.metrics.model_name = state.model_id(engine)
    if engine is not None:
        apply_default_tier(engine, settings.default_tier)
    app.state.sparsedial = state
    app.state.engine_factory = engine_factory
    app.state.on_load_failed = None  # `sparsedial serve` sets it: called with the reason when loading fails
    app.state.on_error = state.metrics.observe_error
    install_error_handlers(app)
    app.add_exception_handler(ClientDisconnected, _client_gone)
    for router in (generate_router, openai_router, tokens_router):  # the inference routes: API key if set
        app.include_router(router, dependencies=[Depends(require_api_key)])
    app.include_router(admin_router)
    app.include_router(docs_router)
    app.include_router(playground_router)  # no API key: the page sends it itself on /generate
    if settings.allowed_origins:  # browsers on other origins (a web UI) may call the API, preflight included
        app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins, allow_methods=["*"],
                           allow_headers=["*"])
    return app
