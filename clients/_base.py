"""HTTP plumbing shared by the sync and async clients: settings from the env, retries with exponential
backoff and jitter (honouring Retry-After), error mapping and server-sent-event streams."""

from __future__ import annotations

import json
import os
import random
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import httpx

from ._exceptions import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APITimeoutError,
)

T = TypeVar("T")
DEFAULT_BASE_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = (429, 503)
MAX_RETRY_AFTER_S = 60.0


@dataclass(frozen=True)
class ClientOptions:
    """Resolved client settings. Arguments win over the env (SPARSEDIAL_BASE_URL, SPARSEDIAL_API_KEY,
    SPARSEDIAL_ADMIN_TOKEN), which wins over the defaults."""

    base_url: str
    api_key: str | None
    admin_token: str | None
    timeout: float | httpx.Timeout
    max_retries: int
    backoff_base_s: float
    backoff_max_s: float

    @classmethod
    def resolve(cls, base_url: str | None, api_key: str | None, admin_token: str | None,
                timeout: float | httpx.Timeout, max_retries: int, backoff_base_s: float,
                backoff_max_s: float) -> ClientOptions:
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        url = (base_url or os.environ.get("SPARSEDIAL_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        key = api_key if api_key is not None else os.environ.get("SPARSEDIAL_API_KEY")
        admin = admin_token if admin_token is not None else os.environ.get("SPARSEDIAL_ADMIN_TOKEN")
        return cls(url, key, admin or key, timeout, max_retries, backoff_base_s, backoff_max_s)

    def headers(self, admin: bool = False) -> dict[str, str]:
        token = self.admin_token if admin else self.api_key
        return {"Authorization": f"Bearer {token}"} if token else {}

    def retry_delay(self, attempt: int, response: httpx.Response | None) -> float:
        """Retry-After when the server sent one (seconds form), else base * 2^attempt with full jitter."""
        if response is not None:
            after = response.headers.get("retry-after")
            try:
                if after is not None:
                    return min(max(float(after), 0.0), MAX_RETRY_AFTER_S)
            except ValueError:
                pass
        cap = min(self.backoff_max_s, self.backoff_base_s * 2 ** attempt)
        return random.uniform(cap / 2, cap)


def should_retry(response: httpx.Response) -> bool:
    return response.status_code in RETRY_STATUSES


def connection_error(exc: httpx.TransportError) -> APIConnectionError:
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(f"request timed out: {exc}")
    return APIConnectionError(f"connection error: {exc}")


def parse(model: Callable[[Any], T], data: Any) -> T:
    try:
        return model(data)
    except ValueError as exc:  # pydantic.ValidationError is a ValueError
        raise APIResponseValidationError(f"unexpected response body: {exc}") from exc


def _event_data(lines: list[str]) -> Any | None:
    """The JSON of one SSE event (its `data:` lines joined), None for `[DONE]`; raises on an error event."""
    data = "\n".join(line[5:].lstrip(" ") for line in lines if line.startswith("data:"))
    if data == "[DONE]":
        return None
    obj = json.loads(data)
    if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
        raise APIError(f"stream error: {obj['error'].get('message', '')}", body=obj["error"])
    return obj


class _SSEBlocks:
    """Groups SSE lines into events; `feed(line)` returns an event's JSON when a blank line ends one that
    has data, `DONE` at `data: [DONE]`, else None."""

    DONE = object()

    def __init__(self) -> None:
        self.block: list[str] = []

    def feed(self, line: str) -> Any:
        if line:
            self.block.append(line)
            return None
        block, self.block = self.block, []
        if not any(b.startswith("data:") for b in block):
            return None
        data = _event_data(block)
        return self.DONE if data is None else data


def iter_sse(lines: Iterator[str]) -> Iterator[Any]:
    """JSON payloads of `data: <json>\\n\\n` events until `data: [DONE]`."""
    events = _SSEBlocks()
    for line in lines:
        data = events.feed(line)
        if data is events.DONE:
            return
        if data is not None:
            yield data


async def aiter_sse(lines: AsyncIterator[str]) -> AsyncIterator[Any]:
    events = _SSEBlocks()
    async for line in lines:
        data = events.feed(line)
        if data is events.DONE:
            return
        if data is not None:
            yield data


class Stream(Generic[T]):
    """Iterator of typed chunks over an open streaming response; closes it when exhausted or on close()."""

    def __init__(self, response: httpx.Response, model: Callable[[Any], T]) -> None:
        self.response, self._model = response, model
        self._it = iter_sse(response.iter_lines())

    def __iter__(self) -> Iterator[T]:
        try:
            for data in self._it:
                yield parse(self._model, data)
        except httpx.TransportError as exc:
            raise connection_error(exc) from exc
        finally:
            self.close()

    def close(self) -> None:
        self.response.close()

    def __enter__(self) -> Stream[T]:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class AsyncStream(Generic[T]):
    """Async iterator of typed chunks; `await stream.aclose()` (or `async with`) releases the connection,
    which makes the server cancel the request."""

    def __init__(self, response: httpx.Response, model: Callable[[Any], T]) -> None:
        self.response, self._model = response, model

    async def __aiter__(self) -> AsyncIterator[T]:
        try:
            async for data in aiter_sse(self.response.aiter_lines()):
                yield parse(self._model, data)
        except httpx.TransportError as exc:
            raise connection_error(exc) from exc
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        await self.response.aclose()

    async def __aenter__(self) -> AsyncStream[T]:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()
