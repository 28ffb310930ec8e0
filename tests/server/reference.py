"""References the HTTP answers are checked against, and failures injected into the real engine.

- `hf_greedy` / `hf_logprobs`: `transformers` on the elastic model's base weights (models/stdlib-tiny), a
  reference independent of sparsedial for the dense tier.
- `direct`: the same engine's own `submit` (no HTTP) for the same request: the reference for the HTTP layer at
  sparse tiers and for sampled requests (a seeded draw depends on nothing but the request).
- `poisoned` / `slowed`: replace the real engine's model-runner `run` for the test: raise for the steps that
  compute a row of one prompt (the engine then fails that request alone), or sleep before each step (so that
  long requests hold their KV slots for as long as a test needs them).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from conftest import DENSE_MODEL, REAL_MODEL

INJECTED = "injected forward failure"


# ------------------------------------------------------------------------------------ transformers
@functools.lru_cache(maxsize=1)
def hf_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(DENSE_MODEL, dtype=torch.float32).eval()


@functools.lru_cache(maxsize=1)
def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(REAL_MODEL)


def encode(text: str) -> list[int]:
    return hf_tokenizer().encode(text, add_special_tokens=False)


def decode(ids: list[int]) -> str:
    return hf_tokenizer().decode(ids, skip_special_tokens=True)


@torch.inference_mode()
def hf_greedy(prompt: str | list[int], max_tokens: int) -> list[int]:
    """Greedy continuation by transformers' generate (cut before the end-of-sequence token, as the server does)."""
    ids = encode(prompt) if isinstance(prompt, str) else list(prompt)
    model = hf_model()
    eos = model.config.eos_token_id
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, do_sample=False,
                         eos_token_id=eos, pad_token_id=eos)[0, len(ids):].tolist()
    return out[:out.index(eos)] if eos in out else out


@torch.inference_mode()
def hf_logprobs(ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits over `ids`: row i is the distribution of token i + 1. [T, V]"""
    return torch.log_softmax(hf_model()(torch.tensor([ids])).logits[0].float(), dim=-1)


# ------------------------------------------------------------------------------------ the engine, no HTTP
@dataclass
class Direct:
    token_ids: list[int]
    text: str
    finish_reason: str
    tier: str
    logprobs: list  # TokenLogprob per token (when asked for)


def direct(engine, prompt: str | list[int], tier=None, **sampling) -> Direct:
    """Run one request through `engine.submit` (the engine's own API, no server) to its end."""
    from sparsedial.engine.api import TokenEvent
    from sparsedial.engine.sampling import SamplingParams

    async def run():
        return [ev async for ev in engine.submit(prompt, SamplingParams(**sampling), tier)]

    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # its own thread: the caller may run a loop (playwright)
        events = pool.submit(asyncio.run, run()).result()
    toks = [e for e in events if isinstance(e, TokenEvent)]
    fin = events[-1]
    return Direct([t.token_id for t in toks], fin.text, fin.finish_reason, fin.tier, [t.logprob for t in toks])


# ------------------------------------------------------------------------------------ injected faults
@contextlib.contextmanager
def _runner_run(engine, wrap) -> Iterator[None]:
    runner = engine.core.runner
    before = vars(runner).get("run")  # an outer patch, or None: the class's method
    runner.run = wrap(runner.run)
    try:
        yield
    finally:
        if before is None:
            del runner.run
        else:
            runner.run = before


def _seqs(out) -> list:
    """The requests a step's forwards compute rows of (the scheduler's Sequence objects)."""
    return [row.seq for row in out.rows]


@contextlib.contextmanager
def poisoned(engine, *prompts: list[int], after_tokens: int = 0) -> Iterator[list[int]]:
    """Every forward that computes a row of a request whose prompt (token ids) is one of `prompts` raises
    RuntimeError, from the step after its `after_tokens`-th generated token on (0: its prefill already). Yields a
    list that counts the failed forwards."""
    failed: list[int] = []

    def wrap(real):
        def run(out):
            if any(s.prompt_ids in prompts and len(s.output_ids) >= after_tokens for s in _seqs(out)):
                failed.append(1)
                raise RuntimeError(INJECTED)
            return real(out)
        return run

    with _runner_run(engine, wrap):
        yield failed


@contextlib.contextmanager
def slowed(engine, seconds: float) -> Iterator[None]:
    """Each engine step sleeps `seconds` before its forwards (the results are the real ones)."""
    def wrap(real):
        def run(out):
            time.sleep(seconds)
            return real(out)
        return run

    with _runner_run(engine, wrap):
        yield


# ------------------------------------------------------------------------------------ SSE
def sse_payloads(raw: str | Iterable[str]) -> list:
    """The JSON payloads of a server-sent event stream (a whole body or its lines), then 'DONE' for [DONE]."""
    lines = raw.split("\n") if isinstance(raw, str) else raw
    out: list = []
    for line in lines:
        if line == "data: [DONE]":
            out.append("DONE")
        elif line.startswith("data: "):
            out.append(json.loads(line[6:]))
    return out
