"""The engine's public contract: what the server (and any other caller) sees.

The serving engine (`sparsedial.engine.AsyncEngine`) implements `EngineProtocol`; the server depends only
on this module (and on engine/tiers.py for the resolved `TierSpec`). The server's tests run on the real
engine; failures are injected by patching one method of it (tests/server/reference.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, Union, runtime_checkable

from sparsedial.errors import SparsedialError

from .options import LoadSignal, PolicyMode

if TYPE_CHECKING:  # pragma: no cover
    from .sampling import SamplingParams
    from .tiers import TierSpec

FinishReason = Literal["stop", "length", "cancelled", "error"]
TierRequest = Union[str, float, "TierSpec", None]


class UnknownTierError(SparsedialError, ValueError):
    """The requested sparsity is not served by this model. `tiers` lists the valid names."""

    def __init__(self, requested: object, tiers: list[str], max_percent: int = 0) -> None:
        self.requested, self.tiers, self.max_percent = requested, tiers, max_percent
        percents = f", or any whole percent from 1% to {max_percent}%" if max_percent >= 1 else ""
        super().__init__(f"unknown sparsity tier {requested!r}; available: {', '.join(tiers)}, auto{percents}")


class PromptTooLongError(SparsedialError, ValueError):
    def __init__(self, prompt_tokens: int, max_tokens: int, context: int) -> None:
        self.prompt_tokens, self.max_tokens, self.context = prompt_tokens, max_tokens, context
        super().__init__(f"prompt of {prompt_tokens} tokens + max_tokens {max_tokens} exceeds the model's "
                         f"context of {context} tokens")


class EngineOverloadedError(SparsedialError):
    """The waiting queue is full; retry after `retry_after` seconds."""

    def __init__(self, waiting: int, limit: int, retry_after: float = 1.0) -> None:
        self.waiting, self.limit, self.retry_after = waiting, limit, retry_after
        super().__init__(f"engine overloaded: {waiting} requests waiting (limit {limit}); retry later")


class EngineNotReadyError(SparsedialError):
    """The engine is still loading or has stopped."""


@dataclass(frozen=True)
class Timings:
    """Seconds, measured by the engine with a monotonic clock."""

    queue: float = 0.0  # submit -> admitted (prefill starts)
    ttft: float | None = None  # submit -> first generated token
    e2e: float = 0.0  # submit -> finished
    inter_token: tuple[float, ...] = ()  # gaps between consecutive generated tokens


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    text: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()  # (token_id, text, logprob) of the top alternatives


@dataclass(frozen=True)
class TokenEvent:
    """One generated token. `text` is the newly decodable text (may be '' mid-character)."""

    index: int
    token_id: int
    text: str
    logprob: TokenLogprob | None = None


@dataclass(frozen=True)
class FinishEvent:
    """Always the last event of a stream."""

    finish_reason: FinishReason
    text: str  # the whole generated text (stop strings removed)
    tier: str
    prompt_tokens: int
    completion_tokens: int
    timings: Timings = field(default_factory=Timings)
    error: str | None = None


StreamEvent = TokenEvent | FinishEvent


@dataclass(frozen=True)
class PolicySpec:
    """Tier policy. `fixed`: every `auto` request gets `default_tier`. `load`: `ladder` maps load to a tier:
    each (threshold, tier) pair applies when load >= threshold (load = waiting + running requests, or KV use
    in [0, 1] when `signal` is "kv"); `hysteresis` is how far load must fall below a threshold to step back."""

    mode: PolicyMode = PolicyMode.FIXED
    default_tier: str = "dense"
    ladder: tuple[tuple[float, str], ...] = ()
    signal: LoadSignal = LoadSignal.REQUESTS
    hysteresis: float = 0.0


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    kv_slots_used: int
    kv_slots_total: int
    current_auto_tier: str


@runtime_checkable
class EngineProtocol(Protocol):
    model_name: str
    tiers: list[str]  # tier names in order, e.g. ["dense", "30%", ..., "2:4"]
    max_context: int
    tokenizer: object  # transformers tokenizer (chat template, counting)

    def resolve_tier(self, requested: TierRequest) -> TierSpec | None:
        """The tier a request names (engine/tiers.py), or None for auto; raises UnknownTierError. Callers pass
        the result to `submit`, which then checks it without parsing it again."""

    def submit(self, prompt: str | list[int], params: SamplingParams, tier: TierRequest = None,
               request_id: str | None = None) -> AsyncIterator[StreamEvent]:
        """Queue a request; iterate the result for its events. Raises EngineOverloadedError,
        PromptTooLongError, UnknownTierError at submit time. Closing the iterator early (aclose, or the
        consumer task being cancelled) cancels the request and frees its slot at once."""

    def get_policy(self) -> PolicySpec: ...

    def set_policy(self, policy: PolicySpec) -> None:
        """Change the default tier / policy; requests already admitted keep their tier."""

    def stats(self) -> EngineStats: ...


@dataclass(frozen=True)
class PromptLogprobs:
    """Log-probabilities of a prompt's own tokens under one tier (for loglikelihood evaluation, e.g.
    lm-eval's `echo` + `logprobs`). `logprobs[0]` is None: the first token has nothing to condition on."""

    tier: str
    token_ids: tuple[int, ...]
    texts: tuple[str, ...]  # each token's text, so that the texts concatenate to the prompt
    logprobs: tuple[TokenLogprob | None, ...]


@runtime_checkable
class SupportsPromptLogprobs(Protocol):
    """Optional engine capability (added for the server's /v1/completions `echo` + `logprobs`); an engine
    without it makes the server answer such requests with a 400 saying they are not supported."""

    async def prompt_logprobs(self, prompt: str | list[int], tier: TierRequest = None,
                              top: int = 0) -> PromptLogprobs:
        """Score `prompt` (one forward, no generation) with `top` alternatives per position. Raises
        PromptTooLongError, UnknownTierError, EngineOverloadedError like `submit`."""
