"""Typed responses of the SDK. Models allow unknown fields, so a newer server never breaks an older client."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class Usage(_Model):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(_Model):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(_Model):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(_Model):
    """A /v1/completions response, or one chunk of its stream (same shape)."""

    id: str
    object: str = "text_completion"
    created: int = 0
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    tier: str | None = None


class TopLogprob(_Model):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(_Model):
    content: list[ChatTokenLogprob] | None = None


class ChatMessage(_Model):
    role: str = "assistant"
    content: str | None = None


class ChatChoice(_Model):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletion(_Model):
    id: str
    object: str = "chat.completion"
    created: int = 0
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    tier: str | None = None


class ChatDelta(_Model):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(_Model):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Model):
    id: str
    object: str = "chat.completion.chunk"
    created: int = 0
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    tier: str | None = None


class Model(_Model):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "sparsedial"
    root: str | None = None
    parent: str | None = None
    tier: str | None = None


class ModelList(_Model):
    object: str = "list"
    data: list[Model]


class Timings(_Model):
    queue_s: float = 0.0
    ttft_s: float | None = None
    e2e_s: float = 0.0
    mean_itl_s: float | None = None


class TokenLogprob(_Model):
    token_id: int
    text: str
    logprob: float
    top: list[tuple[int, str, float]] = []


class GenerateResponse(_Model):
    """A /generate response; also the last event (`type == "finish"`) of its stream."""

    id: str
    model: str
    text: str
    tier: str
    finish_reason: str
    usage: Usage
    timings: Timings
    logprobs: list[TokenLogprob] | None = None
    type: Literal["finish"] | None = None


class GenerateToken(_Model):
    """One token event of a streamed /generate."""

    type: Literal["token"] = "token"
    id: str
    index: int
    token_id: int
    text: str
    logprob: TokenLogprob | None = None


GenerateChunk = GenerateToken | GenerateResponse


class LadderStep(_Model):
    threshold: float
    tier: str


class Policy(_Model):
    mode: Literal["fixed", "load"]
    default_tier: str
    ladder: list[LadderStep] = []
    signal: str = "requests"
    hysteresis: float = 0.0


class TierState(_Model):
    default_tier: str
    policy: Policy
    current_auto_tier: str
    tiers: list[str]


def parse_generate_chunk(data: dict[str, Any]) -> GenerateChunk:
    return GenerateToken.model_validate(data) if data.get("type") == "token" else GenerateResponse.model_validate(data)
