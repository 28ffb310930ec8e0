"""OpenAI-compatible routes: /v1/models, /v1/completions and /v1/chat/completions (JSON or SSE).

The tier comes from the `sparsity` body field (openai-python: `extra_body={"sparsity": "50%"}`) or from a
`<model>@<tier>` model id listed by /v1/models; every response names the tier that served it (`tier`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from sparsedial.engine.api import EngineProtocol, FinishEvent, StreamEvent, TokenEvent, TokenLogprob
from sparsedial.engine.tiers import TierSpec

from .chat import render_chat
from .deps import (
    ServerState,
    check_logprobs,
    check_n,
    get_engine,
    get_state,
    model_ids,
    new_id,
    request_tier,
    sampling_params,
    tokenize,
)
from .errors import APIError
from .protocol import ErrorResponse, UsageInfo
from .protocol_openai import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    TopLogprob,
    _OpenAIRequest,
)
from .scoring import echo_choices, needs_scoring, score_prompts
from .serving import SSE_DONE, Choice, RequestRun, guarded_stream, sse

router = APIRouter(prefix="/v1")
ERRORS = {c: {"model": ErrorResponse} for c in (400, 404, 413, 429, 503)}
Job = tuple[str | list[int], object, str | None]


@router.get("/models", response_model=ModelList)
async def list_models(state: ServerState = Depends(get_state),
                      engine: EngineProtocol = Depends(get_engine)) -> ModelList:
    """The model (tier chosen by the policy) and one `<model>@<tier>` entry per tier, with `parent`."""
    return ModelList(data=_cards(state, engine))


def _cards(state: ServerState, engine: EngineProtocol) -> list[ModelCard]:
    name, ctx = state.model_id(engine), engine.max_context
    cards = [ModelCard(id=name, root=name, max_model_len=ctx)]
    return cards + [ModelCard(id=f"{name}@{t}", root=name, parent=name, tier=t, max_model_len=ctx)
                    for t in engine.tiers]


@router.get("/models/{model_id:path}", response_model=ModelCard, responses={404: {"model": ErrorResponse}})
async def retrieve_model(model_id: str, state: ServerState = Depends(get_state),
                         engine: EngineProtocol = Depends(get_engine)) -> ModelCard:
    """One entry of /v1/models (openai-python's `models.retrieve`); 404 for an id this server does not serve."""
    for card in _cards(state, engine):
        if card.id == model_id:
            return card
    raise APIError(404, f"model {model_id!r} not found; available: {', '.join(model_ids(state, engine))}",
                   param="model", code="model_not_found")


def finish_reason(ev: FinishEvent) -> str:
    return ev.finish_reason if ev.finish_reason in ("stop", "length") else "stop"


def usage_of(finishes: list[FinishEvent], n: int) -> UsageInfo:
    """Prompt tokens once per prompt (choices come in groups of n per prompt), completion tokens of all."""
    prompt = sum(ev.prompt_tokens for i, ev in enumerate(finishes) if i % n == 0)
    completion = sum(ev.completion_tokens for ev in finishes)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


# field -> (is its value the neutral one?, what to send instead): accepted for compatibility only
UNSUPPORTED = {
    "presence_penalty": (lambda b: b.presence_penalty == 0, "send 0 or leave it out"),
    "frequency_penalty": (lambda b: b.frequency_penalty == 0, "send 0 or leave it out"),
    "logit_bias": (lambda b: not b.logit_bias, "leave it out"),
    "response_format": (lambda b: b.response_format in (None, {"type": "text"}), 'send {"type": "text"}'),
    "tools": (lambda b: not b.tools, "leave it out"),
    "tool_choice": (lambda b: b.tool_choice in (None, "none", "auto"), 'send "none" or leave it out'),
    "min_tokens": (lambda b: b.min_tokens == 0, "send 0 or leave it out"),
    "repetition_penalty": (lambda b: b.repetition_penalty == 1.0, "send 1 or leave it out"),
    "best_of": (lambda b: getattr(b, "best_of", None) in (None, b.n), "send best_of = n or leave it out"),
    "suffix": (lambda b: not getattr(b, "suffix", None), "leave it out"),
}


def _check_common(body: _OpenAIRequest, state: ServerState) -> None:
    check_n(state.settings, body.n)
    for name, (neutral, advice) in UNSUPPORTED.items():
        if not neutral(body):
            raise APIError(400, f"{name} is not supported by sparsedial ({advice})", param=name,
                           code="unsupported_parameter")


def _jobs(state: ServerState, body: _OpenAIRequest, prompts: list[list[int]], tiers: list[TierSpec | str | None],
          max_tokens: int, logprobs: int | None) -> list[Job]:
    """n jobs per prompt; a seeded request gives choice j the seed `seed + j` so the choices differ."""
    jobs: list[Job] = []
    for prompt, tier in zip(prompts, tiers):
        for j in range(body.n):
            seed = None if body.seed is None else body.seed + j
            params = sampling_params(state.settings, max_tokens=max_tokens, temperature=body.temperature,
                                     top_p=body.top_p, top_k=body.top_k, stop=body.stop, seed=seed,
                                     logprobs=logprobs, ignore_eos=body.ignore_eos)
            jobs.append((prompt, params, tier))
    return jobs


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt", code="invalid_value")
    if isinstance(prompt[0], int):
        return [prompt]  # type: ignore[list-item]
    return list(prompt)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- completions
def completion_logprobs(lps: list[TokenLogprob | None], offset: int = 0) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for lp in lps:
        if lp is None:
            continue
        out.tokens.append(lp.text)
        out.token_logprobs.append(lp.logprob)
        out.top_logprobs.append({text: v for _, text, v in lp.top})
        out.text_offset.append(offset)
        offset += len(lp.text)
    return out


def _completion_choice(i: int, c: Choice, echo: str, with_logprobs: bool) -> CompletionChoice:
    assert c.finish is not None
    lps = completion_logprobs([t.logprob for t in c.tokens], len(echo)) if with_logprobs else None
    return CompletionChoice(index=i, text=echo + c.finish.text, logprobs=lps, finish_reason=finish_reason(c.finish))


@router.post("/completions", response_model=CompletionResponse, responses=ERRORS)
async def completions(body: CompletionRequest, request: Request, state: ServerState = Depends(get_state),
                      engine: EngineProtocol = Depends(get_engine)):
    """OpenAI text completions; `echo` with `logprobs` returns prompt-token logprobs (lm-eval loglikelihood)."""
    _check_common(body, state)
    tier = request_tier(state, engine, body.model, body.sparsity)
    prompts = _prompts(body.prompt)
    if len(prompts) > state.settings.max_n:  # each prompt takes n KV slots, as n does
        raise APIError(400, f"{len(prompts)} prompts in one request; this server accepts at most "
                            f"{state.settings.max_n}", param="prompt", code="invalid_value")
    ids = [await tokenize(engine, state.settings, p) for p in prompts]
    rid, poll = new_id("cmpl"), state.settings.disconnect_poll_s
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    check_logprobs(state.settings, body.logprobs)  # before scoring, which builds no SamplingParams
    if needs_scoring(body):
        scored = await score_prompts(engine, ids, tier, body.logprobs or 0, request, poll)
        if max_tokens == 0:
            choices, usage, tier_used = echo_choices(scored, body.n)
            return CompletionResponse(id=rid, model=body.model, choices=choices, usage=usage, tier=tier_used)
        tiers: list[TierSpec | str | None] = [s.tier for s in scored]
    else:
        scored, tiers = None, [tier] * len(prompts)
    run = RequestRun.start(engine, state.metrics, "/v1/completions",
                           _jobs(state, body, ids, tiers, max_tokens, body.logprobs), rid)
    echo_texts = [_prompt_text(engine, p) if body.echo else "" for p in prompts]
    if body.stream:
        _, events = await guarded_stream(run, request, poll)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        gen = _completion_sse(events, rid, body.model, echo_texts, body.n, include_usage, body.logprobs)
        return StreamingResponse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    done = await run.collect(request, poll)
    choices = [_completion_choice(i, c, echo_texts[i // body.n], body.logprobs is not None)
               for i, c in enumerate(done)]
    if scored is not None:
        choices = echo_choices(scored, body.n, choices)[0]
    finishes = [c.finish for c in done if c.finish is not None]
    return CompletionResponse(id=rid, model=body.model, choices=choices, usage=usage_of(finishes, body.n),
                              tier=finishes[0].tier)


def _prompt_text(engine: EngineProtocol, prompt: str | list[int]) -> str:
    return prompt if isinstance(prompt, str) else engine.tokenizer.decode(prompt)  # type: ignore[attr-defined]


async def _completion_sse(events: AsyncIterator[tuple[int, StreamEvent]], rid: str, model: str,
                          echo_texts: list[str], n: int, include_usage: bool,
                          logprobs: int | None) -> AsyncIterator[bytes]:
    pending_echo = {i: echo_texts[i // n] for i in range(len(echo_texts) * n) if echo_texts[i // n]}
    offsets: dict[int, int] = {}
    finishes: list[FinishEvent | None] = [None] * (len(echo_texts) * n)
    try:
        async for i, ev in events:
            prefix = pending_echo.pop(i, "")
            if isinstance(ev, TokenEvent):
                lps = None
                if logprobs is not None and ev.logprob is not None:
                    lps = completion_logprobs([ev.logprob], offsets.get(i, len(prefix)))
                    offsets[i] = lps.text_offset[-1] + len(ev.logprob.text)
                choice = CompletionChoice(index=i, text=prefix + ev.text, logprobs=lps)
                yield sse(CompletionResponse(id=rid, model=model, choices=[choice]))
            else:
                finishes[i] = ev
                choice = CompletionChoice(index=i, text=prefix, finish_reason=finish_reason(ev))
                yield sse(CompletionResponse(id=rid, model=model, choices=[choice], tier=ev.tier))
        if include_usage:
            done = [f for f in finishes if f is not None]
            yield sse(CompletionResponse(id=rid, model=model, choices=[], usage=usage_of(done, n),
                                         tier=done[0].tier if done else None))
    except APIError as exc:
        yield sse(exc.body())
    yield SSE_DONE


# ------------------------------------------------------------------------------------------------- chat
def chat_logprobs(lps: list[TokenLogprob | None]) -> ChatLogprobs:
    content = [ChatTokenLogprob(token=lp.text, logprob=lp.logprob, bytes=list(lp.text.encode()),
                                top_logprobs=[TopLogprob(token=t, logprob=v, bytes=list(t.encode()))
                                              for _, t, v in lp.top])
               for lp in lps if lp is not None]
    return ChatLogprobs(content=content)


def _chat_max_tokens(body: ChatCompletionRequest, engine: EngineProtocol, n_prompt: int) -> int:
    """Explicit max_completion_tokens / max_tokens, else what is left of the context after the prompt."""
    if body.max_completion_tokens is not None:
        return body.max_completion_tokens
    if body.max_tokens is not None:
        return body.max_tokens
    return max(1, engine.max_context - n_prompt)


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request, state: ServerState = Depends(get_state),
                           engine: EngineProtocol = Depends(get_engine)):
    """OpenAI chat completions; the prompt comes from the tokenizer's chat template (or the documented
    fallback for tokenizers without one, see server/chat.py)."""
    _check_common(body, state)
    tier = request_tier(state, engine, body.model, body.sparsity)
    top = (body.top_logprobs or 0) if body.logprobs else None
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
    check_logprobs(state.settings, top, param="top_logprobs")
    # the template runs in a worker thread too: a long conversation must not stall the event loop
    prompt = await asyncio.to_thread(render_chat, engine.tokenizer, body.messages, body.add_generation_prompt)
    ids = await tokenize(engine, state.settings, prompt)
    rid, poll = new_id("chatcmpl"), state.settings.disconnect_poll_s
    jobs = _jobs(state, body, [ids], [tier], _chat_max_tokens(body, engine, len(ids)), top)
    run = RequestRun.start(engine, state.metrics, "/v1/chat/completions", jobs, rid)
    if body.stream:
        _, events = await guarded_stream(run, request, poll)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        gen = _chat_sse(events, rid, body.model, body.n, include_usage, top is not None)
        return StreamingResponse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    done = await run.collect(request, poll)
    choices = []
    for i, c in enumerate(done):
        assert c.finish is not None
        lps = chat_logprobs([t.logprob for t in c.tokens]) if top is not None else None
        choices.append(ChatChoice(index=i, message=ChatResponseMessage(content=c.finish.text), logprobs=lps,
                                  finish_reason=finish_reason(c.finish)))
    finishes = [c.finish for c in done if c.finish is not None]
    return ChatCompletionResponse(id=rid, model=body.model, choices=choices, usage=usage_of(finishes, body.n),
                                  tier=finishes[0].tier)


async def _chat_sse(events: AsyncIterator[tuple[int, StreamEvent]], rid: str, model: str, n: int,
                    include_usage: bool, with_logprobs: bool) -> AsyncIterator[bytes]:
    started: set[int] = set()
    finishes: list[FinishEvent | None] = [None] * n
    try:
        async for i, ev in events:
            if i not in started:  # OpenAI's first delta of a choice carries the role
                started.add(i)
                first = ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))
                yield sse(ChatCompletionChunk(id=rid, model=model, choices=[first]))
            if isinstance(ev, TokenEvent):
                lps = chat_logprobs([ev.logprob]) if with_logprobs and ev.logprob is not None else None
                choice = ChatChunkChoice(index=i, delta=ChatDelta(content=ev.text), logprobs=lps)
                yield sse(ChatCompletionChunk(id=rid, model=model, choices=[choice]))
            else:
                finishes[i] = ev
                choice = ChatChunkChoice(index=i, delta=ChatDelta(), finish_reason=finish_reason(ev))
                yield sse(ChatCompletionChunk(id=rid, model=model, choices=[choice], tier=ev.tier))
        if include_usage:
            done = [f for f in finishes if f is not None]
            yield sse(ChatCompletionChunk(id=rid, model=model, choices=[], usage=usage_of(done, n),
                                          tier=done[0].tier if done else None))
    except APIError as exc:
        yield sse(exc.body())
    yield SSE_DONE


__all__ = ["model_ids", "router"]
