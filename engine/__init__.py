"""sparsedial's runtime: the decoder, elastic tiers, the continuous-batching engine and sampling.

Names are exported lazily (PEP 562), so `import sparsedial.engine` imports neither torch nor the model.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "AsyncEngine": ".async_engine",
    "RequestStream": ".async_engine",
    "EngineConfig": ".runner",
    "EngineCore": ".runner",
    "ElasticModel": ".elastic",
    "TierPolicy": ".policy",
    "SamplingParams": ".sampling",
    "PolicySpec": ".api",
    "TokenEvent": ".api",
    "FinishEvent": ".api",
    "Timings": ".api",
    "EngineStats": ".api",
    "UnknownTierError": ".api",
    "EngineOverloadedError": ".api",
    "PromptTooLongError": ".api",
    "EngineNotReadyError": ".api",
}

__all__ = [
    "AsyncEngine", "ElasticModel", "EngineConfig", "EngineCore", "EngineNotReadyError", "EngineOverloadedError",
    "EngineStats", "FinishEvent", "PolicySpec", "PromptTooLongError", "RequestStream", "SamplingParams",
    "TierPolicy", "Timings", "TokenEvent", "UnknownTierError",
]

if TYPE_CHECKING:  # pragma: no cover
    from .api import (
        EngineNotReadyError,
        EngineOverloadedError,
        EngineStats,
        FinishEvent,
        PolicySpec,
        PromptTooLongError,
        Timings,
        TokenEvent,
        UnknownTierError,
    )
    from .async_engine import AsyncEngine, RequestStream
    from .elastic import ElasticModel
    from .policy import TierPolicy
    from .runner import EngineConfig, EngineCore
    from .sampling import SamplingParams


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
