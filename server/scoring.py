"""Prompt-token logprobs for /v1/completions `echo` + `logprobs` (lm-evaluation-harness's loglikelihood
requests: `echo: true, logprobs: k, max_tokens: 0 or 1`). Needs the engine's optional
`SupportsPromptLogprobs` capability; without it such requests get a 400 that says so."""

from __future__ import annotations

from fastapi import Request
from sparsedial.engine.api import EngineProtocol, PromptLogprobs, SupportsPromptLogprobs

from .errors import APIError, from_engine_error
from .protocol import UsageInfo
from .protocol_openai import CompletionChoice, CompletionLogprobs, CompletionRequest
from .serving import race_disconnect


def needs_scoring(body: CompletionRequest) -> bool:
    if not (body.echo and body.logprobs is not None):
        return False
    if body.stream:
        raise APIError(400, "echo with logprobs (prompt logprobs) is only supported without streaming",
                       param="stream", code="unsupported_parameter")
    return True


async def score_prompts(engine: EngineProtocol, prompts: list[str | list[int]], tier: str | None, top: int,
                        request: Request, poll_s: float) -> list[PromptLogprobs]:
    if not isinstance(engine, SupportsPromptLogprobs):
        raise APIError(400, "prompt logprobs (echo with logprobs) are not supported by this engine; drop "
                            "echo or logprobs", param="echo", code="unsupported_parameter")
    out = []
    for prompt in prompts:
        try:
            out.append(await race_disconnect(engine.prompt_logprobs(prompt, tier, top), request, poll_s))
        except Exception as exc:
            err = from_engine_error(exc)
            if err is None:
                raise
            raise err from exc
    return out


def prompt_logprobs_block(pl: PromptLogprobs) -> CompletionLogprobs:
    """OpenAI's logprobs block for the prompt: the first token's logprob and top are None."""
    out, offset = CompletionLogprobs(), 0
    for text, lp in zip(pl.texts, pl.logprobs):
        out.tokens.append(text)
        out.token_logprobs.append(None if lp is None else lp.logprob)
        out.top_logprobs.append(None if lp is None else {t: v for _, t, v in lp.top})
        out.text_offset.append(offset)
        offset += len(text)
    return out


def _merge(prompt: CompletionLogprobs, gen: CompletionLogprobs | None) -> CompletionLogprobs:
    if gen is None:
        return prompt
    return CompletionLogprobs(tokens=prompt.tokens + gen.tokens,
                              token_logprobs=prompt.token_logprobs + gen.token_logprobs,
                              top_logprobs=prompt.top_logprobs + gen.top_logprobs,
                              text_offset=prompt.text_offset + gen.text_offset)


def echo_choices(scored: list[PromptLogprobs], n: int, generated: list[CompletionChoice] | None = None
                 ) -> tuple[list[CompletionChoice], UsageInfo, str]:
    """Choices whose text and logprobs start with the prompt's; `generated` (already echoing the prompt
    text, offsets shifted past it) supplies the rest. Without it (max_tokens 0) the prompt alone."""
    choices = []
    for i in range(len(scored) * n):
        pl = scored[i // n]
        block = prompt_logprobs_block(pl)
        if generated is None:
            choices.append(CompletionChoice(index=i, text="".join(pl.texts), logprobs=block, finish_reason="length"))
        else:
            g = generated[i]
            choices.append(g.model_copy(update={"logprobs": _merge(block, g.logprobs)}))
    prompt_tokens = sum(len(pl.token_ids) for pl in scored)
    usage = UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=0, total_tokens=prompt_tokens)
    return choices, usage, scored[0].tier
