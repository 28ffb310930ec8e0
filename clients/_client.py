"""`SparseDial` (sync) and `AsyncSparseDial`: openai-python's shape (resources, typed responses, stream
iterators, exceptions by status) for the sparsedial server, over httpx.

    client = SparseDial()                       # SPARSEDIAL_BASE_URL, default http://127.0.0.1:8000
    r = client.completions.create(model=client.models.list().data[0].id, prompt="def f(", sparsity="50%")
    for chunk in client.generate("import os", stream=True): ...
    client.admin.set_tier(default_tier="2:4")   # needs SPARSEDIAL_ADMIN_TOKEN
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from . import types as t
from ._base import AsyncStream, ClientOptions, Stream, connection_error, parse, should_retry
from ._exceptions import status_error
from ._resources import (
    Call,
    Sparsity,
    chat_call,
    completion_call,
    generate_call,
    get_tier_call,
    models_call,
    set_tier_call,
)

Prompt = str | list[str] | list[int] | list[list[int]]


class _ClientBase:
    def __init__(self, base_url: str | None, api_key: str | None, admin_token: str | None,
                 timeout: float | httpx.Timeout, max_retries: int, backoff_base_s: float,
                 backoff_max_s: float) -> None:
        self._opts = ClientOptions.resolve(base_url, api_key, admin_token, timeout, max_retries, backoff_base_s,
                                           backoff_max_s)

    @property
    def base_url(self) -> str:
        return self._opts.base_url


class SparseDial(_ClientBase):
    """Synchronous client. Retries 429/503 and connection errors `max_retries` times (exponential backoff
    with jitter, or the server's Retry-After); `timeout` is seconds per request (or an httpx.Timeout)."""

    def __init__(self, base_url: str | None = None, *, api_key: str | None = None, admin_token: str | None = None,
                 timeout: float | httpx.Timeout = 60.0, max_retries: int = 2, backoff_base_s: float = 0.5,
                 backoff_max_s: float = 8.0, http_client: httpx.Client | None = None) -> None:
        super().__init__(base_url, api_key, admin_token, timeout, max_retries, backoff_base_s, backoff_max_s)
        self._http = http_client or httpx.Client(base_url=self._opts.base_url, timeout=timeout)
        self.completions = Completions(self)
        self.chat = Chat(self)
        self.models = Models(self)
        self.admin = Admin(self)

    def _send(self, call: Call) -> httpx.Response:
        opts = self._opts
        for attempt in range(opts.max_retries + 1):
            last = attempt == opts.max_retries
            request = self._http.build_request(call.method, call.path, json=call.body,
                                               headers=opts.headers(call.admin))
            try:
                response = self._http.send(request, stream=call.stream)
            except httpx.TransportError as exc:
                if last:
                    raise connection_error(exc) from exc
                time.sleep(opts.retry_delay(attempt, None))
                continue
            if response.status_code < 400:
                return response
            response.read()
            if last or not should_retry(response):
                raise status_error(response)
            response.close()
            time.sleep(opts.retry_delay(attempt, response))
        raise AssertionError("unreachable")

    def _request(self, call: Call) -> Any:
        response = self._send(call)
        if call.stream:
            return Stream(response, call.model)
        return parse(call.model, response.json())

    def generate(self, prompt: str | list[int], *, max_tokens: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, top_k: int | None = None, stop: str | list[str] | None = None,
                 seed: int | None = None, logprobs: int | None = None, sparsity: Sparsity = None,
                 stream: bool = False, extra_body: dict[str, Any] | None = None
                 ) -> t.GenerateResponse | Stream[t.GenerateChunk]:
        """POST /generate. With stream=True: GenerateToken chunks, then one GenerateResponse (type finish)."""
        return self._request(generate_call(prompt=prompt, max_tokens=max_tokens, temperature=temperature,
                                           top_p=top_p, top_k=top_k, stop=stop, seed=seed, logprobs=logprobs,
                                           sparsity=sparsity, stream=stream, extra_body=extra_body))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SparseDial:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class AsyncSparseDial(_ClientBase):
    """Asynchronous client; same resources and options as `SparseDial`, every call awaited."""

    def __init__(self, base_url: str | None = None, *, api_key: str | None = None, admin_token: str | None = None,
                 timeout: float | httpx.Timeout = 60.0, max_retries: int = 2, backoff_base_s: float = 0.5,
                 backoff_max_s: float = 8.0, http_client: httpx.AsyncClient | None = None) -> None:
        super().__init__(base_url, api_key, admin_token, timeout, max_retries, backoff_base_s, backoff_max_s)
        self._http = http_client or httpx.AsyncClient(base_url=self._opts.base_url, timeout=timeout)
        self.completions = AsyncCompletions(self)
        self.chat = AsyncChat(self)
        self.models = AsyncModels(self)
        self.admin = AsyncAdmin(self)

    async def _send(self, call: Call) -> httpx.Response:
        opts = self._opts
        for attempt in range(opts.max_retries + 1):
            last = attempt == opts.max_retries
            request = self._http.build_request(call.method, call.path, json=call.body,
                                               headers=opts.headers(call.admin))
            try:
                response = await self._http.send(request, stream=call.stream)
            except httpx.TransportError as exc:
                if last:
                    raise connection_error(exc) from exc
                await asyncio.sleep(opts.retry_delay(attempt, None))
                continue
            if response.status_code < 400:
                return response
            await response.aread()
            if last or not should_retry(response):
                raise status_error(response)
            await response.aclose()
            await asyncio.sleep(opts.retry_delay(attempt, response))
        raise AssertionError("unreachable")

    async def _request(self, call: Call) -> Any:
        response = await self._send(call)
        if call.stream:
            return AsyncStream(response, call.model)
        return parse(call.model, response.json())

    async def generate(self, prompt: str | list[int], *, max_tokens: int | None = None,
                       temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                       stop: str | list[str] | None = None, seed: int | None = None, logprobs: int | None = None,
                       sparsity: Sparsity = None, stream: bool = False, extra_body: dict[str, Any] | None = None
                       ) -> t.GenerateResponse | AsyncStream[t.GenerateChunk]:
        return await self._request(generate_call(prompt=prompt, max_tokens=max_tokens, temperature=temperature,
                                                 top_p=top_p, top_k=top_k, stop=stop, seed=seed, logprobs=logprobs,
                                                 sparsity=sparsity, stream=stream, extra_body=extra_body))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncSparseDial:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()


# ------------------------------------------------------------------------------------------------ resources
class _Resource:
    def __init__(self, client: Any) -> None:
        self._client = client


class Completions(_Resource):
    def create(self, *, model: str, prompt: Prompt, max_tokens: int | None = None, temperature: float | None = None,
               top_p: float | None = None, top_k: int | None = None, n: int | None = None,
               stop: str | list[str] | None = None, seed: int | None = None, logprobs: int | None = None,
               echo: bool | None = None, sparsity: Sparsity = None, stream: bool = False,
               include_usage: bool | None = None, extra_body: dict[str, Any] | None = None
               ) -> t.Completion | Stream[t.Completion]:
        """POST /v1/completions; `sparsity` (or a `<model>@<tier>` model id) picks the tier."""
        return self._client._request(completion_call(**_args(locals())))


class ChatCompletions(_Resource):
    def create(self, *, model: str, messages: list[dict[str, Any]], max_tokens: int | None = None,
               temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
               n: int | None = None, stop: str | list[str] | None = None, seed: int | None = None,
               logprobs: bool | None = None, top_logprobs: int | None = None, sparsity: Sparsity = None,
               stream: bool = False, include_usage: bool | None = None, extra_body: dict[str, Any] | None = None
               ) -> t.ChatCompletion | Stream[t.ChatCompletionChunk]:
        """POST /v1/chat/completions."""
        return self._client._request(chat_call(**_args(locals())))


class Chat(_Resource):
    def __init__(self, client: Any) -> None:
        super().__init__(client)
        self.completions = ChatCompletions(client)


class Models(_Resource):
    def list(self) -> t.ModelList:
        """GET /v1/models: the model and one `<model>@<tier>` entry per tier."""
        return self._client._request(models_call())


class Admin(_Resource):
    def get_tier(self) -> t.TierState:
        return self._client._request(get_tier_call())

    def set_tier(self, *, default_tier: str | None = None, mode: str | None = None,
                 ladder: list[tuple[float, str]] | None = None, signal: str | None = None,
                 hysteresis: float | None = None) -> t.TierState:
        """PUT /admin/tier; arguments left out keep their value. `ladder`: [(threshold, tier), ...]."""
        return self._client._request(set_tier_call(**_args(locals())))


class AsyncCompletions(_Resource):
    async def create(self, **kwargs: Any) -> t.Completion | AsyncStream[t.Completion]:
        """Same arguments as `Completions.create`."""
        return await self._client._request(completion_call(**_with_defaults(Completions.create, kwargs)))


class AsyncChatCompletions(_Resource):
    async def create(self, **kwargs: Any) -> t.ChatCompletion | AsyncStream[t.ChatCompletionChunk]:
        """Same arguments as `ChatCompletions.create`."""
        return await self._client._request(chat_call(**_with_defaults(ChatCompletions.create, kwargs)))


class AsyncChat(_Resource):
    def __init__(self, client: Any) -> None:
        super().__init__(client)
        self.completions = AsyncChatCompletions(client)


class AsyncModels(_Resource):
    async def list(self) -> t.ModelList:
        return await self._client._request(models_call())


class AsyncAdmin(_Resource):
    async def get_tier(self) -> t.TierState:
        return await self._client._request(get_tier_call())

    async def set_tier(self, **kwargs: Any) -> t.TierState:
        """Same arguments as `Admin.set_tier`."""
        return await self._client._request(set_tier_call(**_with_defaults(Admin.set_tier, kwargs)))


def _args(local_vars: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in local_vars.items() if k not in ("self", "__class__")}


def _with_defaults(fn: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The sync signature's defaults filled in, so async calls take exactly the same keyword arguments
    (an unknown or missing one raises TypeError like the sync method would)."""
    import inspect

    bound = inspect.signature(fn).bind(None, **kwargs)
    bound.apply_defaults()
    return _args(dict(bound.arguments))
