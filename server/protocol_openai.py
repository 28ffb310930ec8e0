"""OpenAI-compatible wire models for /v1/completions, /v1/chat/completions and /v1/models.

Each request model mirrors OpenAI's field names, defaults and ranges; sparsedial's own fields sit in the
block marked `sparsedial extensions` (the official client sends them with `extra_body={...}`).
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, Field

from .protocol import SPARSITY_DESCRIPTION, RequestModel, Sparsity, StreamOptions, UsageInfo


def _now() -> int:
    return int(time.time())


class _OpenAIRequest(RequestModel):
    """Fields common to both endpoints. Fields of OpenAI's (and vLLM's) API that sparsedial does not implement
    are accepted at their neutral value and refused with a 400 `unsupported_parameter` otherwise
    (routes_openai.UNSUPPORTED), so a client that always sends them works and none is silently ignored."""

    model: str = Field(description="A model id from /v1/models: the model, or `<model>@<tier>`.")
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, description="Choices per prompt (at most the server's max_n).")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Accepted for compatibility; must be 0.")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Accepted for compatibility; must be 0.")
    user: str | None = None
    logit_bias: dict[str, float] | None = Field(None, description="Accepted for compatibility; must be empty.")
    response_format: dict[str, Any] | None = Field(None, description='Only {"type": "text"}.')
    tools: list[dict[str, Any]] | None = Field(None, description="Accepted for compatibility; must be empty.")
    tool_choice: str | dict[str, Any] | None = Field(None, description='Only "none" or "auto" without tools.')
    parallel_tool_calls: bool | None = None
    # vLLM's sampling extensions
    min_tokens: int = Field(0, ge=0, description="Accepted for compatibility (vLLM); must be 0.")
    repetition_penalty: float = Field(1.0, gt=0.0, description="Accepted for compatibility (vLLM); must be 1.")

    # --- sparsedial extensions (not in OpenAI's API) ---
    sparsity: Sparsity = Field(None, description=SPARSITY_DESCRIPTION)
    top_k: int = Field(0, ge=0, description="Keep the k most likely tokens; 0 disables.")
    ignore_eos: bool = Field(False, description="Keep generating past end-of-sequence tokens.")
    # --- end sparsedial extensions ---


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, description="Accepted for compatibility; must equal n.")
    suffix: str | None = Field(None, description="Accepted for compatibility; must be empty.")


class ChatContentPart(RequestModel):
    type: Literal["text"]
    text: str


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ChatContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0, description="Deprecated by OpenAI for max_completion_tokens.")
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    # --- sparsedial extensions (not in OpenAI's API) ---
    add_generation_prompt: bool = Field(True, description="End the templated prompt with the assistant's "
                                                          "turn header.")
    # --- end sparsedial extensions ---


# ------------------------------------------------------------------------------------------------ responses
class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    # --- sparsedial extensions ---
    tier: str | None = Field(None, description="The tier that served the request (on the last chunk when "
                                               "streaming).")


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None
    # --- sparsedial extensions ---
    tier: str | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None
    # --- sparsedial extensions ---
    tier: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "sparsedial"
    root: str
    parent: str | None = None
    max_model_len: int | None = Field(None, description="Context length in tokens (prompt + completion), as vLLM.")
    # --- sparsedial extensions ---
    tier: str | None = Field(None, description="The tier this id pins; None for the model itself (auto).")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ------------------------------------------------------------------------------ /tokenize, /detokenize (vLLM)
class TokenizeRequest(RequestModel):
    model: str | None = Field(None, description="A model id from /v1/models (optional: there is one model).")
    prompt: str
    add_special_tokens: bool = False


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str
