"""`POST /generate`: sparsedial's native endpoint (one prompt, the tier, timings; JSON or SSE)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from sparsedial.engine.api import EngineProtocol, FinishEvent, StreamEvent, TokenEvent, TokenLogprob

from .deps import ServerState, get_engine, get_state, new_id, request_tier, sampling_params, tokenize
from .errors import APIError
from .protocol import (
    ErrorResponse,
    GenerateFinishChunk,
    GenerateRequest,
    GenerateResponse,
    GenerateTokenChunk,
    Timings,
    TokenLogprobOut,
    UsageInfo,
)
from .serving import SSE_DONE, RequestRun, guarded_stream, sse

router = APIRouter()
ERRORS = {c: {"model": ErrorResponse} for c in (400, 413, 429, 503)}


def logprob_out(lp: TokenLogprob | None) -> TokenLogprobOut | None:
    if lp is None:
        return None
    return TokenLogprobOut(token_id=lp.token_id, text=lp.text, logprob=lp.logprob, top=[tuple(t) for t in lp.top])


def timings_out(ev: FinishEvent) -> Timings:
    gaps = ev.timings.inter_token
    return Timings(queue_s=ev.timings.queue, ttft_s=ev.timings.ttft, e2e_s=ev.timings.e2e,
                   mean_itl_s=sum(gaps) / len(gaps) if gaps else None)


def generate_response(rid: str, model: str, ev: FinishEvent, tokens: list[TokenEvent] | None,
                      cls: type[GenerateResponse] = GenerateResponse) -> GenerateResponse:
    usage = UsageInfo(prompt_tokens=ev.prompt_tokens, completion_tokens=ev.completion_tokens,
                      total_tokens=ev.prompt_tokens + ev.completion_tokens)
    logprobs = [logprob_out(t.logprob) for t in tokens] if tokens and tokens[0].logprob is not None else None
    return cls(id=rid, model=model, text=ev.text, tier=ev.tier, finish_reason=ev.finish_reason, usage=usage,
               timings=timings_out(ev), logprobs=logprobs)


async def _sse(events: AsyncIterator[tuple[int, StreamEvent]], rid: str, model: str) -> AsyncIterator[bytes]:
    try:
        async for _, ev in events:
            if isinstance(ev, TokenEvent):
                yield sse(GenerateTokenChunk(id=rid, index=ev.index, token_id=ev.token_id, text=ev.text,
                                             logprob=logprob_out(ev.logprob)))
            else:
                yield sse(generate_response(rid, model, ev, None, GenerateFinishChunk))
    except APIError as exc:
        yield sse(exc.body())
    yield SSE_DONE


@router.post("/generate", response_model=GenerateResponse, responses=ERRORS,
             summary="Complete a prompt at a chosen sparsity tier")
async def generate(body: GenerateRequest, request: Request, state: ServerState = Depends(get_state),
                   engine: EngineProtocol = Depends(get_engine)):
    """One prompt; `sparsity` picks the tier ("auto" or absent: the operator's policy). `stream: true`
    sends one SSE event per token, then the full response (type "finish"), then `data: [DONE]`."""
    model = state.model_id(engine)
    tier = request_tier(state, engine, model, body.sparsity)
    params = sampling_params(state.settings, max_tokens=body.max_tokens, temperature=body.temperature,
                             top_p=body.top_p, top_k=body.top_k, stop=body.stop, seed=body.seed,
                             logprobs=body.logprobs, ignore_eos=body.ignore_eos)
    ids = await tokenize(engine, state.settings, body.prompt)
    rid = new_id("gen")
    run = RequestRun.start(engine, state.metrics, "/generate", [(ids, params, tier)], rid)
    poll = state.settings.disconnect_poll_s
    if body.stream:
        _, events = await guarded_stream(run, request, poll)
        return StreamingResponse(_sse(events, rid, model), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    (choice,) = await run.collect(request, poll)
    assert choice.finish is not None
    return generate_response(rid, model, choice.finish, choice.tokens)
