"""A small deterministic engine implementing `EngineProtocol`, for HTTP-layer tests.

Tokenizer: one token per character (id = code point). Generation: the characters of ALPHABET in order,
one per `token_delay` seconds, whatever the prompt; `eos_after` ends with "stop" after that many tokens.
At most `max_running` requests run at once (the rest wait); `max_waiting` bounds the waiting queue (429).
Every submission and every cancellation is recorded for assertions.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from sparsedial.engine.api import (
    EngineOverloadedError,
    EngineStats,
    FinishEvent,
    PolicySpec,
    PromptLogprobs,
    PromptTooLongError,
    StreamEvent,
    TierRequest,
    Timings,
    TokenEvent,
    TokenLogprob,
    UnknownTierError,
)
from sparsedial.engine.sampling import SamplingParams

ALPHABET = "abcdefghijklmnopqrstuvwxyz"
TIERS = ["dense", "30%", "50%", "2:4"]


class FakeTokenizer:
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


@dataclass
class Submitted:
    request_id: str | None
    prompt: str | list[int]
    params: SamplingParams
    tier: str | None


class FakeStream:
    """Like the real RequestStream: aclose() before the first event still releases the request."""

    def __init__(self, engine: FakeEngine, gen: AsyncIterator[StreamEvent], request_id: str | None) -> None:
        self._engine, self._gen, self._rid, self._started = engine, gen, request_id, False

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> StreamEvent:
        self._started = True
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        if not self._started:
            self._started = True
            self._engine.waiting -= 1
            self._engine.cancelled.append(self._rid)
        await self._gen.aclose()  # type: ignore[attr-defined]


class FakeEngine:
    def __init__(self, *, token_delay: float = 0.0, max_running: int = 4, max_waiting: int = 8,
                 max_context: int = 256, eos_after: int | None = None, retry_after: float = 2.0) -> None:
        self.model_name, self.tiers, self.max_context = "fake-model", list(TIERS), max_context
        self.tokenizer = FakeTokenizer()
        self.token_delay, self.max_running, self.max_waiting = token_delay, max_running, max_waiting
        self.eos_after, self.retry_after = eos_after, retry_after
        self.policy = PolicySpec()
        self.running = self.waiting = 0
        self.submitted: list[Submitted] = []
        self.cancelled: list[str | None] = []
        self._sem: asyncio.Semaphore | None = None

    # ------------------------------------------------------------------------------------------ protocol
    def resolve_tier(self, requested: TierRequest) -> str | None:
        if requested is None or requested == "auto":
            return None
        if isinstance(requested, (int, float)) and not isinstance(requested, bool):
            name = "dense" if requested == 0 else f"{round(requested * 100)}%"
        else:
            name = str(requested)
        if name not in self.tiers:
            raise UnknownTierError(requested, self.tiers)
        return name

    def submit(self, prompt: str | list[int], params: SamplingParams, tier: TierRequest = None,
               request_id: str | None = None) -> FakeStream:
        name = self.resolve_tier(tier)
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if len(ids) + params.max_tokens > self.max_context:
            raise PromptTooLongError(len(ids), params.max_tokens, self.max_context)
        if self.waiting >= self.max_waiting:
            raise EngineOverloadedError(self.waiting, self.max_waiting, self.retry_after)
        self.submitted.append(Submitted(request_id, prompt, params, name))
        self.waiting += 1
        return FakeStream(self, self._run(len(ids), params, name, request_id), request_id)

    def get_policy(self) -> PolicySpec:
        return self.policy

    def set_policy(self, policy: PolicySpec) -> None:
        self.policy = policy

    def stats(self) -> EngineStats:
        return EngineStats(running=self.running, waiting=self.waiting, kv_slots_used=self.running,
                           kv_slots_total=self.max_running, current_auto_tier=self._auto_tier())

    # ------------------------------------------------------------------------------------------ internals
    def _auto_tier(self) -> str:
        p = self.policy
        if p.mode == "fixed":
            return p.default_tier
        load = self.running + self.waiting
        tier = p.default_tier
        for threshold, step in p.ladder:
            if load >= threshold:
                tier = step
        return tier

    def _token(self, i: int, params: SamplingParams) -> TokenEvent:
        ch = ALPHABET[i % len(ALPHABET)]
        lp = None
        if params.logprobs is not None:
            top = ((ord(ch), ch, -0.5), (ord("Z"), "Z", -1.5))[: params.logprobs]
            lp = TokenLogprob(ord(ch), ch, -0.5, top)
        return TokenEvent(index=i, token_id=ord(ch), text=ch, logprob=lp)

    async def _run(self, n_prompt: int, params: SamplingParams, tier: str | None,
                   request_id: str | None) -> AsyncIterator[StreamEvent]:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.max_running)
        t0, admitted, finished = time.monotonic(), False, False
        try:
            await self._sem.acquire()
            admitted = True
            self.waiting -= 1
            self.running += 1
            tier = tier or self._auto_tier()  # the tier is fixed at admission
            queue, text, reason, gaps, last = time.monotonic() - t0, "", "length", [], None
            for i in range(params.max_tokens):
                await asyncio.sleep(self.token_delay)
                if self.eos_after is not None and i >= self.eos_after and not params.ignore_eos:
                    reason = "stop"
                    break
                ev = self._token(i, params)
                cut = [k for k in (f"{text}{ev.text}".find(s) for s in params.stop) if k >= 0]
                if cut:
                    text, reason = (text + ev.text)[: min(cut)], "stop"
                    break
                now = time.monotonic()
                gaps, last = (gaps + [now - last]) if last is not None else gaps, now
                text += ev.text
                yield ev
            ttft = None if not text else queue
            yield FinishEvent(reason, text, tier, n_prompt, len(text),  # type: ignore[arg-type]
                              Timings(queue=queue, ttft=ttft, e2e=time.monotonic() - t0, inter_token=tuple(gaps)))
            finished = True
        finally:
            if admitted:
                self.running -= 1
                self._sem.release()
            else:
                self.waiting -= 1
            if not finished:
                self.cancelled.append(request_id)


class FakeScoringEngine(FakeEngine):
    """A FakeEngine that also scores prompts (the optional SupportsPromptLogprobs capability)."""

    async def prompt_logprobs(self, prompt: str | list[int], tier: TierRequest = None, top: int = 0) -> PromptLogprobs:
        name = self.resolve_tier(tier) or self._auto_tier()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if len(ids) > self.max_context:
            raise PromptTooLongError(len(ids), 0, self.max_context)
        lps = [None] + [TokenLogprob(i, chr(i), -1.0 - k / 100, ((i, chr(i), -1.0 - k / 100),)[:top])
                        for k, i in enumerate(ids[1:])]
        return PromptLogprobs(name, tuple(ids), tuple(chr(i) for i in ids), tuple(lps))
