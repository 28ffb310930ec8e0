"""`POST /tokenize` and `POST /detokenize` (vLLM's shape), for clients that count or build prompts with the
server's own tokenizer (lm-evaluation-harness's remote tokenizer). Both run the tokenizer in a worker thread."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends
from sparsedial.engine.api import EngineProtocol

from .deps import ServerState, get_engine, get_state, model_ids, tokenize
from .errors import APIError
from .protocol import ErrorResponse
from .protocol_openai import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse

router = APIRouter()
ERRORS = {c: {"model": ErrorResponse} for c in (400, 404, 413, 503)}


def _check_model(state: ServerState, engine: EngineProtocol, model: str | None) -> None:
    if model is not None and model not in model_ids(state, engine):
        raise APIError(404, f"model {model!r} not found; available: {', '.join(model_ids(state, engine))}",
                       param="model", code="model_not_found")


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS)
async def tokenize_route(body: TokenizeRequest, state: ServerState = Depends(get_state),
                         engine: EngineProtocol = Depends(get_engine)) -> TokenizeResponse:
    """The prompt's token ids as the engine sees them (no special tokens unless asked)."""
    _check_model(state, engine, body.model)
    ids = await tokenize(engine, state.settings, body.prompt, add_special_tokens=body.add_special_tokens)
    return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=engine.max_context)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS)
async def detokenize_route(body: DetokenizeRequest, state: ServerState = Depends(get_state),
                           engine: EngineProtocol = Depends(get_engine)) -> DetokenizeResponse:
    """The text of token ids; 400 for ids outside the vocabulary."""
    _check_model(state, engine, body.model)
    size = getattr(engine, "vocab_size", None)  # optional on EngineProtocol; AsyncEngine has it
    bad = next((t for t in body.tokens if t < 0 or (size is not None and t >= size)), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the vocabulary [0, {size})", param="tokens",
                       code="invalid_value")
    decode = engine.tokenizer.decode  # type: ignore[attr-defined]
    return DetokenizeResponse(prompt=await asyncio.to_thread(decode, body.tokens))
