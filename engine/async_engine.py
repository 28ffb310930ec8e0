"""AsyncEngine: the EngineProtocol (engine/api.py) over EngineCore, stepped by one background thread.

`submit()` validates and queues at call time (raising EngineOverloadedError, PromptTooLongError,
UnknownTierError) and returns a `RequestStream`, an async iterator of TokenEvent ... FinishEvent. The
model thread hands events to the submitting event loop with `call_soon_threadsafe`; closing the stream
early (`aclose()`, `break` + close, or the consumer task being cancelled) aborts the request, which frees
its KV slot before `aclose()` returns. The thread sleeps on a condition while there is no work.

`prompt_logprobs()` (lm-eval loglikelihood scoring) needs no KV slot: it queues a job that the same model
thread runs between two steps (one cache-less forward over the prompt at its tier), so a scoring forward
never overlaps a step's forwards; the awaiting coroutine gets the result through a future.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import torch

from .api import (
    EngineNotReadyError,
    EngineOverloadedError,
    EngineStats,
    FinishEvent,
    PolicySpec,
    PromptLogprobs,
    PromptTooLongError,
    StreamEvent,
    TierRequest,
    TokenLogprob,
)
from .elastic import ElasticModel
from .runner import EngineConfig, EngineCore
from .sampling import SamplingParams, TextStream
from .tier_builder import TierBuilder
from .tiers import TierPlan, TierSpec

log = logging.getLogger("sparsedial.engine")
Job = tuple[concurrent.futures.Future, Callable[[], Any]]


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
        self.vocab_size = self.core.vocab_size
        self.tokenizer = em.tokenizer
        self._cond = threading.Condition(self.core.lock)
        self._thread: threading.Thread | None = None
        self._jobs: deque[Job] = deque()  # model-thread work besides steps (prompt scoring), under _cond
        self._stopping = False
        self.error: BaseException | None = None  # set when the loop itself failed (not one request): unhealthy
        self._scoring: Counter[str] = Counter()  # tiers that prompt_logprobs calls wait for or run at
        self.builder = TierBuilder(em, self._cond, self._tiers_in_use, self.core.fail_waiting, config.cpu_threads)
        if config.tier_builder:
            self.core.builder, self.core.runner.evict = self.builder, False

    # ----------------------------------------------------------------------------------------- protocol
    def resolve_tier(self, requested: TierRequest) -> TierSpec | None:
        return self.model.resolve(requested)

    def submit(self, prompt: str | list[int], params: SamplingParams, tier: TierRequest = None,
               request_id: str | None = None) -> RequestStream:
        """Queue a request from a coroutine; iterate the returned stream for its events."""
        self._check_alive()
        stream = RequestStream(self, asyncio.get_running_loop())
        self.start()
        with self._cond:
            stream.request_id = self.core.add(prompt, params, tier, stream._put, request_id)
            self._cond.notify_all()  # the tier builder waits on it too
        return stream

    async def prompt_logprobs(self, prompt: str | list[int], tier: TierRequest = None,
                              top: int = 0) -> PromptLogprobs:
        """Score `prompt` at one tier (api.SupportsPromptLogprobs): one forward without KV cache, on the model
        thread between steps. Raises like `submit` (EngineNotReadyError, PromptTooLongError, UnknownTierError,
        EngineOverloadedError when the waiting queue is full) and ValueError for an empty prompt or `top`
        outside [0, 20]. Cancelling the awaiting task drops the job if it has not started."""
        self._check_alive()
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20:
            raise ValueError(f"top must be an integer in [0, 20], got {top!r}")
        ids = self.core.encode(prompt)
        resolved = self.model.resolve(tier)
        name = None if resolved is None else resolved.name
        if not ids:
            raise ValueError("empty prompt (at least one token is needed)")
        if len(ids) > self.max_context:
            raise PromptTooLongError(len(ids), 0, self.max_context)
        with self._cond:
            if name is not None:  # None (auto): the policy's current tier, which is always kept
                self._scoring[name] += 1
        try:
            if name is not None:
                await self._tier_ready(name)
            future: concurrent.futures.Future = concurrent.futures.Future()
            self.start()
            with self._cond:
                self._check_alive()
                waiting, limit = len(self.core.scheduler.waiting) + len(self._jobs), self.config.max_waiting
                if waiting >= limit:
                    raise EngineOverloadedError(waiting, limit)
                self._jobs.append((future, lambda: self._score(ids, resolved, top)))
                self._cond.notify_all()  # the tier builder waits on it too
            return await asyncio.wrap_future(future)
        finally:
            if name is not None:
                with self._cond:
                    self._scoring[name] -= 1
                    if self._scoring[name] <= 0:
                        del self._scoring[name]

    def _check_alive(self) -> None:
        if self.error is not None:
            raise EngineNotReadyError(f"the engine loop failed ({type(self.error).__name__}); restart the server")
        if self._stopping:
            raise EngineNotReadyError("the engine has been shut down")

    def _tiers_in_use(self) -> set[str]:
        return self.core.tiers_in_use() | set(self._scoring)

    async def _tier_ready(self, name: str, poll_s: float = 0.01) -> None:
        """Wait (without blocking the event loop) until the TierBuilder has built `name`; the caller holds
        `name` in `_scoring` so that it is built and not evicted meanwhile."""
        with self._cond:
            self.builder.request(name)
        while not self.model.is_ready(name):
            self._check_alive()
            await asyncio.sleep(poll_s)

    @torch.inference_mode()
    def _score(self, ids: list[int], tier: TierSpec | None, top: int) -> PromptLogprobs:
        """The model-thread side of prompt_logprobs: auto resolves to the policy's current tier (always kept
        resident), an explicit tier was built by the TierBuilder and is held in `_scoring`."""
        if tier is None:
            with self._cond:
                tier = self.core.policy.tier
        tokens = torch.tensor([ids], device=self.core.runner.device)  # [1, T]
        self.model.ensure([tier.name], evict=False)
        logits = self.model.model(tokens, plan=TierPlan.single(tier))[0]  # [T, V]; no slots: this forward's keys
        logp = torch.log_softmax(logits[:-1].float(), dim=-1)  # [T-1, V]: position i predicts token i+1
        targets = torch.tensor(ids[1:], device=logp.device)
        chosen = logp.gather(1, targets[:, None])[:, 0].tolist()
        alts: list[list[tuple[int, float]]] = [[] for _ in chosen]
        if top:
            vals, idx = torch.topk(logp, min(top, logp.shape[-1]), dim=-1)
            alts = [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
        texts = prompt_texts(self.tokenizer, ids)
        dec = self.tokenizer.decode
        names: dict[int, str] = {}
        lps: list[TokenLogprob | None] = [None]
        for tok, text, lp, alt in zip(ids[1:], texts[1:], chosen, alts):
            lps.append(TokenLogprob(tok, text, lp, tuple((t, names.setdefault(t, dec([t])), v) for t, v in alt)))
        return PromptLogprobs(tier.name, tuple(ids), tuple(texts), tuple(lps))

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
        if self.config.cpu_threads and self.core.runner.device.type == "cpu":
            torch.set_num_threads(self.config.cpu_threads)  # per thread: applies to this model thread
        while True:
            with self._cond:
                while not self._stopping and not self.core.has_work and not self._jobs:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._jobs.popleft() if self._jobs else None
            if job is not None:  # one queued job, then one step: scoring and decoding interleave
                future, fn = job
                if future.set_running_or_notify_cancel():  # False: its awaiting task was cancelled
                    try:
                        future.set_result(fn())
                    except BaseException as e:  # noqa: BLE001 - the job's caller gets the error
                        future.set_exception(e)
            if not self.core.has_work:
                continue
            try:
                computed = self.core.step()
            except BaseException as e:  # noqa: BLE001 - not one request's fault (those fail alone in step)
                self._die(e)
                return
            if not computed:  # every waiting request waits for a tier build: sleep until something changes
                with self._cond:
                    if not self._jobs and not self._stopping:
                        self._cond.wait(timeout=0.05)

    def _die(self, error: BaseException) -> None:
        """The loop failed outside any one request: log it once, fail everything in flight with an error
        (not 'cancelled', which reads as a client's doing), refuse new work; /health then reports it."""
        log.error("engine loop failed; failing %d requests in flight", len(self.core.scheduler.running)
                  + len(self.core.scheduler.waiting), exc_info=error)
        with self._cond:
            self.error = error
            message = f"the engine failed: {type(error).__name__}: {error}"
            self.core.fail_all(message)
            while self._jobs:
                future, _ = self._jobs.popleft()
                if future.set_running_or_notify_cancel():
                    future.set_exception(EngineNotReadyError(message))
            self._cond.notify_all()

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Cancel everything in flight and stop the model thread."""
        with self._cond:
            self._stopping = True
            for seq in list(self.core.scheduler.running) + list(self.core.scheduler.waiting):
                self.core.abort(seq.request_id)
            while self._jobs:
                future, _ = self._jobs.popleft()
                if future.set_running_or_notify_cancel():
                    future.set_exception(EngineNotReadyError("the engine has been shut down"))
            self._cond.notify_all()
        self.builder.stop(timeout)
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> AsyncEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


class _PromptText(TextStream):
    """TextStream's incremental detokenization, keeping special tokens (the prompt's own text)."""

    def _decode(self, ids: list[int]) -> str:
        if self._fast is not None:
            return self._fast.decode(ids, skip_special_tokens=False)
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def prompt_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each token's text, so that the texts concatenate to `tokenizer.decode(ids)`: a token ending inside a
    multi-byte character gets '' and the token completing it the whole character; leftovers go last."""
    stream = _PromptText(tokenizer, [])
    texts = [stream.push(t) for t in ids]
    full = tokenizer.decode(ids)
    joined = "".join(texts)
    if joined != full and full.startswith(joined):
        texts[-1] += full[len(joined):]
    return texts
