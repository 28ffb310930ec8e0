"""sparsedial's HTTP server: `create_app(settings, engine=None)` and `ServerSettings` (imported lazily, so
`import sparsedial.server` stays cheap)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_app
    from .settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "ServerSettings":
        from .settings import ServerSettings

        return ServerSettings
    raise AttributeError(f"module 'sparsedial.server' has no attribute {name!r}")
