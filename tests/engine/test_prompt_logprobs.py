"""AsyncEngine.prompt_logprobs (lm-eval loglikelihood scoring): logprobs equal an independent cache-less
forward of the tier's merged weights (compress/export.py's `tier_weights`), texts rebuild the prompt, the
submit-time errors, and scoring interleaved with decoding changes neither."""

from __future__ import annotations

import asyncio

import pytest
import torch
from sparsedial.compress.export import load_elastic_for_eval, tier_weights
from sparsedial.engine.api import (
    EngineNotReadyError,
    EngineOverloadedError,
    PolicySpec,
    PromptTooLongError,
    SupportsPromptLogprobs,
    UnknownTierError,
)
from sparsedial.engine.sampling import SamplingParams

from .conftest import PROMPTS

PROMPT = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)  # é→ü\n"
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(elastic_dir):
    """A separately loaded base model + elastic state: `logp(tier, ids)` -> log_softmax [T, V] (fp32)."""
    lm, spec, tensors = load_elastic_for_eval(elastic_dir)

    @torch.inference_mode()
    def logp(tier: str, ids: list[int]) -> torch.Tensor:
        with tier_weights(lm.model, spec, tensors, spec.tier(tier)) as model:
            return torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)

    return logp


@pytest.mark.parametrize("tier", ["dense", "60%"])
def test_logprobs_equal_an_independent_forward(engine, reference, tier):
    eng = engine()
    assert isinstance(eng, SupportsPromptLogprobs)
    got = asyncio.run(eng.prompt_logprobs(PROMPT, tier, top=3))
    ids = eng.tokenizer.encode(PROMPT, add_special_tokens=False)
    assert got.tier == tier and list(got.token_ids) == ids and len(got.logprobs) == len(ids) == len(got.texts)
    assert got.logprobs[0] is None and "".join(got.texts) == PROMPT
    want = reference(tier, ids)  # [T, V]
    for i, lp in enumerate(got.logprobs[1:], start=1):
        assert lp.token_id == ids[i] and lp.text == got.texts[i]
        assert lp.logprob == pytest.approx(float(want[i - 1, ids[i]]), abs=1e-4)
        vals, idx = torch.topk(want[i - 1], 3)
        assert [t for t, _, _ in lp.top] == idx.tolist()
        assert [v for _, _, v in lp.top] == pytest.approx(vals.tolist(), abs=1e-4)
        assert [s for _, s, _ in lp.top] == [eng.tokenizer.decode([t]) for t in idx.tolist()]


def test_token_ids_auto_tier_and_top_zero(engine):
    eng = engine(policy=PolicySpec(default_tier="2:4"))
    ids = eng.tokenizer.encode(PROMPT, add_special_tokens=False)[:20] + [0]  # ends with the special token

    async def main():
        return await eng.prompt_logprobs(ids), await eng.prompt_logprobs(ids, "2:4", top=2)

    auto, explicit = asyncio.run(main())
    assert auto.tier == "2:4" and "".join(auto.texts) == eng.tokenizer.decode(ids)
    assert all(lp.top == () for lp in auto.logprobs[1:])
    assert [lp.logprob for lp in auto.logprobs[1:]] == [lp.logprob for lp in explicit.logprobs[1:]]


def test_errors_like_submit(engine):
    eng = engine()

    async def score(prompt, tier=None, **kw):
        return await eng.prompt_logprobs(prompt, tier, **kw)

    with pytest.raises(UnknownTierError, match="available"):
        asyncio.run(score(PROMPT, "13:7"))
    with pytest.raises(PromptTooLongError, match="257 tokens"):
        asyncio.run(score([5] * 257))
    assert asyncio.run(score([5] * 256, "dense")).logprobs[-1] is not None  # the whole context fits
    with pytest.raises(ValueError, match="empty prompt"):
        asyncio.run(score(""))
    with pytest.raises(ValueError, match="top"):
        asyncio.run(score(PROMPT, top=21))
    with pytest.raises(EngineOverloadedError):
        asyncio.run(engine(max_waiting=0).prompt_logprobs(PROMPT))
    eng.shutdown()
    with pytest.raises(EngineNotReadyError):
        asyncio.run(score(PROMPT))


def test_scoring_interleaved_with_decoding_changes_neither(engine, make_core):
    eng = engine()
    gen_tiers = ["dense", "2:4", "60%", "45%"]
    score_tiers = ["30%", "dense", "2:4", "70%", "45%", "30%"]

    async def alone():
        return [await eng.prompt_logprobs(PROMPT, t, top=2) for t in score_tiers]

    async def mixed():
        streams = [eng.submit(p, GREEDY, t) for p, t in zip(PROMPTS, gen_tiers)]
        scored = asyncio.gather(*(eng.prompt_logprobs(PROMPT, t, top=2) for t in score_tiers))
        cancelled = asyncio.ensure_future(eng.prompt_logprobs(PROMPT, "dense"))
        await asyncio.sleep(0)
        cancelled.cancel()  # dropped (or its result discarded); the engine carries on
        events = await asyncio.gather(*(s.collect() for s in streams))
        return events, await scored

    base = asyncio.run(alone())
    events, scored = asyncio.run(mixed())
    want = make_core().generate(PROMPTS, GREEDY, gen_tiers)
    for ev, w in zip(events, want):
        assert [e.token_id for e in ev[:-1]] == w.token_ids and ev[-1].tier == w.finish.tier
    for a, b in zip(base, scored):
        assert a.tier == b.tier
        assert [lp.logprob for lp in a.logprobs[1:]] == pytest.approx([lp.logprob for lp in b.logprobs[1:]],
                                                                       abs=1e-5)
    assert eng.stats().running == eng.stats().waiting == eng.stats().kv_slots_used == 0
