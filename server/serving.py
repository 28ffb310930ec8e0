"""Running engine requests for a route: submit with HTTP error mapping, fan-out over choices, client
disconnect handling and SSE framing.

A request's engine streams are always closed (`aclose`) when the route is done with them, whether it
finished, failed or its client went away, so an abandoned request frees its KV slot at once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel
from sparsedial.engine.api import EngineProtocol, FinishEvent, StreamEvent, TierRequest, TokenEvent
from sparsedial.engine.sampling import SamplingParams

from .errors import APIError, from_engine_error
from .metrics import ServerMetrics

T = TypeVar("T")
SSE_DONE = b"data: [DONE]\n\n"


class ClientDisconnected(Exception):
    """The HTTP client closed its connection before the response was complete."""


def sse(payload: BaseModel | dict) -> bytes:
    """One server-sent event: `data: <json>\\n\\n`."""
    data = payload.model_dump_json(exclude_none=False) if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


async def race_disconnect(aw: Awaitable[T], request: Request, poll_s: float) -> T:
    """Await `aw`, but cancel it and raise ClientDisconnected if the client goes away meanwhile."""
    task = asyncio.ensure_future(aw)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientDisconnected()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def submit(engine: EngineProtocol, prompt: str | list[int], params: SamplingParams, tier: TierRequest,
           request_id: str) -> AsyncIterator[StreamEvent]:
    """`engine.submit` with its submit-time exceptions turned into HTTP errors."""
    try:
        return engine.submit(prompt, params, tier, request_id=request_id)
    except Exception as exc:
        err = from_engine_error(exc)
        if err is None:
            raise
        raise err from exc


async def close_all(streams: Sequence[AsyncIterator[StreamEvent]]) -> None:
    for s in streams:
        aclose = getattr(s, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except Exception:  # noqa: BLE001 - closing is best effort; the request is over either way
                pass


@dataclass
class Choice:
    """Events of one choice, gathered for a non-streaming response."""

    tokens: list[TokenEvent] = field(default_factory=list)
    finish: FinishEvent | None = None


class RequestRun:
    """The engine streams of one HTTP request (one per choice), with metrics and cleanup."""

    def __init__(self, engine: EngineProtocol, metrics: ServerMetrics, endpoint: str,
                 streams: list[AsyncIterator[StreamEvent]]) -> None:
        self.engine, self.metrics, self.endpoint, self.streams = engine, metrics, endpoint, streams

    @classmethod
    def start(cls, engine: EngineProtocol, metrics: ServerMetrics, endpoint: str,
              jobs: list[tuple[str | list[int], SamplingParams, TierRequest]], request_id: str) -> RequestRun:
        """Submit every job; on a failure close the ones already submitted and raise its HTTP error."""
        streams: list[AsyncIterator[StreamEvent]] = []
        try:
            for i, (prompt, params, tier) in enumerate(jobs):
                streams.append(submit(engine, prompt, params, tier, f"{request_id}-{i}"))
        except BaseException:
            _close_soon(streams)
            raise
        return cls(engine, metrics, endpoint, streams)

    def _record(self, ev: FinishEvent) -> None:
        if ev.finish_reason == "error":
            raise APIError(500, f"generation failed: {ev.error or 'unknown engine error'}", code="engine_error")
        self.metrics.observe_finish(self.endpoint, ev)

    async def collect(self, request: Request, poll_s: float) -> list[Choice]:
        """Run every choice to its end (non-streaming); cancel everything if the client leaves."""
        async def one(stream: AsyncIterator[StreamEvent]) -> Choice:
            c = Choice()
            async for ev in stream:
                if isinstance(ev, TokenEvent):
                    c.tokens.append(ev)
                else:
                    c.finish = ev
            return c

        try:
            choices = await race_disconnect(asyncio.gather(*(one(s) for s in self.streams)), request, poll_s)
        finally:
            await close_all(self.streams)
        for c in choices:
            if c.finish is None:
                raise APIError(500, "the engine stream ended without a finish event", code="engine_error")
            self._record(c.finish)
        return choices

    async def events(self) -> AsyncIterator[tuple[int, StreamEvent]]:
        """(choice index, event) pairs from all streams as they come; closes the streams when done."""
        if len(self.streams) == 1:
            try:
                async for ev in self.streams[0]:
                    if isinstance(ev, FinishEvent):
                        self._record(ev)
                    yield 0, ev
            finally:
                await close_all(self.streams)
            return
        queue: asyncio.Queue[tuple[int, StreamEvent | BaseException | None]] = asyncio.Queue()

        async def pump(i: int, stream: AsyncIterator[StreamEvent]) -> None:
            try:
                async for ev in stream:
                    await queue.put((i, ev))
                await queue.put((i, None))
            except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
                await queue.put((i, exc))

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(self.streams)]
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    if isinstance(item, FinishEvent):
                        self._record(item)
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await close_all(self.streams)


def _close_soon(streams: list[AsyncIterator[StreamEvent]]) -> None:
    if streams:
        asyncio.ensure_future(close_all(streams))


async def guarded_stream(run: RequestRun, request: Request, poll_s: float
                         ) -> tuple[tuple[int, StreamEvent] | None, AsyncIterator[tuple[int, StreamEvent]]]:
    """The first event, taken before the HTTP response starts (so errors an engine raises lazily still get
    a proper status code), and an iterator over the rest. Each step races the client's disconnection: a
    client that leaves, even while its request waits in the queue, cancels it and frees its slot."""
    it = run.events()

    async def step() -> tuple[int, StreamEvent] | None:
        return await race_disconnect(anext(it, None), request, poll_s)

    try:
        first = await step()
    except BaseException as exc:
        await it.aclose()
        err = from_engine_error(exc) if isinstance(exc, Exception) else None
        if err is not None:
            raise err from exc
        raise

    async def rest() -> AsyncIterator[tuple[int, StreamEvent]]:
        try:
            item = first
            while item is not None:
                yield item
                item = await step()
        except ClientDisconnected:
            return
        finally:
            await it.aclose()

    return first, rest()
