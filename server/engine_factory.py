"""Building the real engine from settings (kept apart so the app module imports no model code)."""

from __future__ import annotations

from sparsedial.engine.api import EngineProtocol

from sparsedial.errors import SparsedialError

from .settings import ServerSettings


def engine_config(settings: ServerSettings):  # -> sparsedial.engine.EngineConfig
    """The EngineConfig for `settings`; options left unset keep EngineConfig's own defaults."""
    from sparsedial.engine import EngineConfig

    options = {"model": settings.model, "device": settings.device, "dtype": settings.dtype,
               "backend": settings.backend, "max_batch": settings.max_running,
               "max_waiting": settings.max_waiting, "model_name": settings.served_model_name,
               "allow_external_base": settings.allow_external_base}
    try:
        return EngineConfig(**{k: v for k, v in options.items() if v is not None})
    except ValueError as exc:
        raise SparsedialError(f"invalid engine settings: {exc}") from exc


def build_engine(settings: ServerSettings) -> EngineProtocol:
    """Load `settings.model` into a `sparsedial.engine.AsyncEngine` (blocking: run it in a thread)."""
    from sparsedial.engine import AsyncEngine

    if not settings.model.is_dir():
        raise SparsedialError(f"model directory not found: {settings.model}")
    return AsyncEngine(engine_config(settings))
