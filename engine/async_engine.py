"""AsyncEngine: the EngineProtocol (engine/api.py) over EngineCore, stepped by one background thread.

`submit()` validates and queues at call time (raising EngineOverloadedError, PromptTooLongError,
UnknownTierError) and returns a `RequestStream`, an async iterator of TokenEvent ... FinishEvent. The
model thread hands events to the submitting event loop with `call_soon_threadsafe`; closing the stream
early (`aclose()`, `break` + close, or the consumer task being cancelled) aborts the request, which frees
its KV slot before `aclose()` returns. The thread sleeps on a condition while there is no work.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from .api import (
    EngineNotReadyError,
    EngineStats,
    FinishEvent,
    PolicySpec,
    StreamEvent,
    TierRequest,
)
from .elastic import ElasticModel
from .runner import EngineConfig, EngineCore
from .sampling import SamplingParams


class RequestStream:
    """The events of one request (async iterator). FinishEvent is always last."""

    def __init__(self, engine: AsyncEngine, loop: asyncio.AbstractEventLoop) -> None:
        self._engine, self._loop = engine, loop
        self._queue: asyncio.Queue[StreamEvent] = asyncio.Queue()
        self.request_id = ""
        self.finished = False

    def _put(self, event: StreamEvent) -> None:  # called from the model thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the consumer's loop has closed: nobody is listening
            pass

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StreamEvent:
        if self.finished:
            raise StopAsyncIteration
        try:
            event = await self._queue.get()
        except asyncio.CancelledError:
            self._cancel()
            raise
        if isinstance(event, FinishEvent):
            self.finished = True
        return event

    def _cancel(self) -> None:
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)

    async def aclose(self) -> None:
        """Cancel the request if it is still running (its slot is free when this returns)."""
        self._cancel()

    async def collect(self) -> list[StreamEvent]:
        """All remaining events."""
        return [e async for e in self]


class AsyncEngine:
    """Serves one (elastic) model to many concurrent requests; implements api.EngineProtocol."""

    def __init__(self, config: EngineConfig, model: ElasticModel | None = None) -> None:
        """Load the model (unless given) and prepare the KV cache; the model thread starts on first use."""
        self.config = config
        em = model if model is not None else config.load_model()
        self.model = em
        self.core = EngineCore(em, config)
        self.model_name = config.model_name or config.model.name
        self.tiers = em.tiers
        self.max_context = self.core.max_context
        self.tokenizer = em.tokenizer
        self._cond = threading.Condition(self.core.lock)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None

    # ----------------------------------------------------------------------------------------- protocol
    def resolve_tier(self, requested: TierRequest) -> str | None:
        return self.model.resolve(requested)

    def submit(self, prompt: str | list[int], params: SamplingParams, tier: TierRequest = None,
               request_id: str | None = None) -> RequestStream:
        """Queue a request from a coroutine; iterate the returned stream for its events."""
        if self._stopping:
            raise EngineNotReadyError("the engine has been shut down")
        stream = RequestStream(self, asyncio.get_running_loop())
        self.start()
        with self._cond:
            stream.request_id = self.core.add(prompt, params, tier, stream._put, request_id)
            self._cond.notify()
        return stream

    def abort(self, request_id: str) -> bool:
        """Cancel a request now; False when it already finished."""
        return self.core.abort(request_id)

    def get_policy(self) -> PolicySpec:
        return self.core.policy.spec

    def set_policy(self, policy: PolicySpec) -> None:
        """Takes effect for requests admitted from now on; raises ValueError / UnknownTierError."""
        self.core.set_policy(policy)

    def stats(self) -> EngineStats:
        return self.core.stats()

    # ----------------------------------------------------------------------------------------- thread
    def start(self) -> None:
        """Start the model thread (idempotent)."""
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="sparsedial-engine", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self.core.has_work:
                    self._cond.wait()
                if self._stopping:
                    return
            try:
                self.core.step()
            except BaseException as e:  # pragma: no cover - step() already fails requests on model errors
                self.error = e
                with self._cond:
                    for seq in list(self.core.scheduler.running) + list(self.core.scheduler.waiting):
                        self.core.abort(seq.request_id)

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Cancel everything in flight and stop the model thread."""
        with self._cond:
            self._stopping = True
            for seq in list(self.core.scheduler.running) + list(self.core.scheduler.waiting):
                self.core.abort(seq.request_id)
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> AsyncEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
