"""Request builders shared by the sync and async clients: each resource method turns its arguments into a
`Call` (method, path, JSON body, response model); the client executes it with retries."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from . import types as t

T = TypeVar("T")
Sparsity = str | float | None


@dataclass(frozen=True)
class Call(Generic[T]):
    method: str
    path: str
    model: Callable[[Any], Any]
    body: dict[str, Any] | None = None
    admin: bool = False
    stream: bool = False


def _body(fields: dict[str, Any], extra_body: dict[str, Any] | None) -> dict[str, Any]:
    """Drop unset (None) fields; `extra_body` entries are added last and win."""
    body = {k: v for k, v in fields.items() if v is not None}
    return {**body, **(extra_body or {})}


def completion_call(*, model: str, prompt: str | list[str] | list[int] | list[list[int]],
                    max_tokens: int | None, temperature: float | None, top_p: float | None, top_k: int | None,
                    n: int | None, stop: str | list[str] | None, seed: int | None, logprobs: int | None,
                    echo: bool | None, sparsity: Sparsity, stream: bool, include_usage: bool | None,
                    extra_body: dict[str, Any] | None) -> Call:
    fields = dict(model=model, prompt=prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                  top_k=top_k, n=n, stop=stop, seed=seed, logprobs=logprobs, echo=echo, sparsity=sparsity,
                  stream=stream or None,
                  stream_options={"include_usage": True} if stream and include_usage else None)
    return Call("POST", "/v1/completions", t.Completion.model_validate, _body(fields, extra_body), stream=stream)


def chat_call(*, model: str, messages: list[dict[str, Any]], max_tokens: int | None, temperature: float | None,
              top_p: float | None, top_k: int | None, n: int | None, stop: str | list[str] | None,
              seed: int | None, logprobs: bool | None, top_logprobs: int | None, sparsity: Sparsity,
              stream: bool, include_usage: bool | None, extra_body: dict[str, Any] | None) -> Call:
    fields = dict(model=model, messages=messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                  top_k=top_k, n=n, stop=stop, seed=seed, logprobs=logprobs, top_logprobs=top_logprobs,
                  sparsity=sparsity, stream=stream or None,
                  stream_options={"include_usage": True} if stream and include_usage else None)
    parse = t.ChatCompletionChunk.model_validate if stream else t.ChatCompletion.model_validate
    return Call("POST", "/v1/chat/completions", parse, _body(fields, extra_body), stream=stream)


def generate_call(*, prompt: str | list[int], max_tokens: int | None, temperature: float | None,
                  top_p: float | None, top_k: int | None, stop: str | list[str] | None, seed: int | None,
                  logprobs: int | None, sparsity: Sparsity, stream: bool,
                  extra_body: dict[str, Any] | None) -> Call:
    fields = dict(prompt=prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                  stop=stop, seed=seed, logprobs=logprobs, sparsity=sparsity, stream=stream or None)
    parse = t.parse_generate_chunk if stream else t.GenerateResponse.model_validate
    return Call("POST", "/generate", parse, _body(fields, extra_body), stream=stream)


def models_call() -> Call:
    return Call("GET", "/v1/models", t.ModelList.model_validate)


def get_tier_call() -> Call:
    return Call("GET", "/admin/tier", t.TierState.model_validate, admin=True)


def set_tier_call(*, default_tier: str | None, mode: str | None, ladder: list[tuple[float, str]] | None,
                  signal: str | None, hysteresis: float | None) -> Call:
    steps = None if ladder is None else [{"threshold": th, "tier": tier} for th, tier in ladder]
    body = _body(dict(default_tier=default_tier, mode=mode, ladder=steps, signal=signal, hysteresis=hysteresis),
                 None)
    return Call("PUT", "/admin/tier", t.TierState.model_validate, body, admin=True)
