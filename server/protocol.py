"""Wire models shared by every route, plus sparsedial's own `/generate` and `/admin/tier` bodies.

The OpenAI-compatible bodies live in `protocol_openai.py`. Request models (`RequestModel`) forbid unknown
fields, so a typo (`sparsty`) is a 400 naming the field rather than a silently ignored option; they are
strict (`"max_tokens": "2"`, `true` or `"stream": "yes"` are refused, not coerced; an integer is still a
number), refuse Infinity/NaN, and refuse strings that are not valid Unicode (a lone surrogate such as
"\ud800" parses from JSON but cannot be tokenized or even encoded into a response).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Sparsity = str | float | None
"""`"dense" | "2:4" | "<n>%" | float in [0, max] | "auto"`; None means auto."""

SPARSITY_DESCRIPTION = ('Tier to serve this request: "dense", "2:4", "<n>%", a number in [0, max] (snapped to '
                        'the checkpoint granularity) or "auto" (the operator\'s policy; the default).')


class InvalidUnicodeError(ValueError):
    """A request string with no UTF-8 form; `param` is the top-level field it is in (for the error body)."""

    def __init__(self, path: str, position: int) -> None:
        self.param = path.split(".")[0].split("[")[0] or None
        super().__init__(f"{path or 'body'}: text is not valid Unicode (a lone surrogate at character "
                         f"{position}); send UTF-8 text")


def _reject_invalid_unicode(value: Any, path: str = "") -> None:
    """Raise InvalidUnicodeError at the first string (key or value) with no UTF-8 form (lone surrogates)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidUnicodeError(path, e.start) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _reject_invalid_unicode(k, path)
            _reject_invalid_unicode(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _reject_invalid_unicode(v, f"{path}[{i}]")


class RequestModel(BaseModel):
    """Base of every request body (module docstring)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        _reject_invalid_unicode(data)
        return data


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorDetail


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class StreamOptions(RequestModel):
    include_usage: bool = False


# ----------------------------------------------------------------------------------------------- /generate
class GenerateRequest(RequestModel):
    """`POST /generate`: one prompt, sampling fields and the sparsity tier."""


    prompt: str | list[int] = Field(description="Text, or token ids, to complete.")
    max_tokens: int = Field(64, ge=0, description="Maximum number of tokens to generate.")
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="0 is greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Keep the k most likely tokens; 0 disables.")
    stop: str | list[str] | None = Field(None, description="Strings that end generation (not returned).")
    seed: int | None = Field(None, description="Seed of this request's own random generator.")
    logprobs: int | None = Field(None, ge=0, le=20, description="Return each token's logprob and this many "
                                                               "top alternatives.")
    ignore_eos: bool = Field(False, description="Keep generating past end-of-sequence tokens.")
    sparsity: Sparsity = Field(None, description=SPARSITY_DESCRIPTION)
    stream: bool = Field(False, description="Stream tokens as server-sent events.")


class Timings(BaseModel):
    """Seconds measured by the engine: queue (submit -> admitted), ttft, e2e and mean inter-token latency."""

    queue_s: float
    ttft_s: float | None
    e2e_s: float
    mean_itl_s: float | None


class TokenLogprobOut(BaseModel):
    token_id: int
    text: str
    logprob: float
    top: list[tuple[int, str, float]] = []


class GenerateResponse(BaseModel):
    id: str
    model: str
    text: str
    tier: str
    finish_reason: str
    usage: UsageInfo
    timings: Timings
    logprobs: list[TokenLogprobOut] | None = None


class GenerateTokenChunk(BaseModel):
    """One SSE event of a streamed `/generate`; the last event is a `GenerateResponse` with type "finish"."""

    type: Literal["token"] = "token"
    id: str
    index: int
    token_id: int
    text: str
    logprob: TokenLogprobOut | None = None


class GenerateFinishChunk(GenerateResponse):
    type: Literal["finish"] = "finish"


# -------------------------------------------------------------------------------------------- /admin/tier
class LadderStep(RequestModel):
    """Under the `load` policy, `tier` applies once load >= `threshold`."""

    threshold: float = Field(ge=0.0)
    tier: str


class PolicyOut(BaseModel):
    mode: Literal["fixed", "load"]
    default_tier: str
    ladder: list[LadderStep]
    signal: Literal["requests", "kv"]
    hysteresis: float


class TierState(BaseModel):
    """`GET /admin/tier`: the default tier, the policy, the tier `auto` maps to right now and all tiers."""

    default_tier: str
    policy: PolicyOut
    current_auto_tier: str
    tiers: list[str]


class TierUpdate(RequestModel):
    """`PUT /admin/tier`: fields left out keep their current value. Requests in flight keep their tier."""

    default_tier: str | None = Field(None, description="Tier for `auto` requests under `fixed` (and below the "
                                                       "first ladder step under `load`).")
    mode: Literal["fixed", "load"] | None = Field(None, description="fixed: always the default tier; load: "
                                                                    "the ladder picks a tier from load.")
    ladder: list[LadderStep] | None = Field(None, description="(threshold, tier) steps, for mode `load`.")
    signal: Literal["requests", "kv"] | None = Field(None, description="Load signal: waiting+running requests, "
                                                                       "or KV use in [0, 1].")
    hysteresis: float | None = Field(None, ge=0.0, description="How far load must fall below a threshold to "
                                                               "step back.")


class HealthResponse(BaseModel):
    status: Literal["ok", "loading", "failed"]
    model: str | None = None
    tiers: list[str] = []
    detail: str | None = None
