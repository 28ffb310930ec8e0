"""EngineCore on the synthetic elastic model: batched == alone for every tier and mixed tiers, engine at
tier k == generate() on the statically merged model, sampling, stops, logprobs, chunking, policy."""

from __future__ import annotations

import pytest
from sparsedial.engine.api import FinishEvent, PolicySpec, PromptTooLongError, TokenEvent, UnknownTierError
from sparsedial.engine.sampling import SamplingParams

from sparsedial.testing import generate

from .conftest import PROMPTS

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
TIERS = ["dense", "30%", "40%", "50%", "60%", "70%", "2:4", "45%"]


def tokens(gens) -> list[list[int]]:
    return [g.token_ids for g in gens]


@pytest.mark.parametrize("tier", TIERS)
def test_batched_equals_alone_and_the_static_model(make_core, em, static, tier):
    core = make_core()
    batched = core.generate(PROMPTS, GREEDY, tier)
    assert all(g.finish.tier == tier and g.finish.finish_reason == "length" for g in batched)
    for prompt, g in zip(PROMPTS, batched):
        assert core.generate([prompt], GREEDY, tier)[0].token_ids == g.token_ids
    ref = static.at(tier)
    want = generate(ref.model, ref.tokenizer, PROMPTS, GREEDY)
    assert tokens(batched) == [c.tokens for c in want]
    assert [g.finish.text for g in batched] == [c.text for c in want]


def test_a_batch_mixing_tiers_equals_each_request_alone(make_core):
    core = make_core(max_batch=8)
    prompts = PROMPTS * 2
    tiers = ["2:4", "dense", "70%", "45%", "30%", "2:4", "dense", "60%"]
    mixed = core.generate(prompts, GREEDY, tiers)
    assert [g.finish.tier for g in mixed] == tiers
    alone = [core.generate([p], GREEDY, t)[0].token_ids for p, t in zip(prompts, tiers)]
    assert tokens(mixed) == alone
    assert len({tuple(a) for a in alone[:4]}) == 4  # different tiers really give different text here


def test_continuous_batching_with_few_slots_and_chunked_prefill(make_core):
    long_prompt = "import os\nimport sys\n\n\ndef main(argv):\n    for arg in argv:\n        print(arg)\n"
    prompts = PROMPTS + [long_prompt]
    ref = make_core(max_batch=8).generate(prompts, GREEDY, "50%")
    core = make_core(max_batch=2, prefill_chunk=5, max_step_tokens=8)
    assert tokens(core.generate(prompts, GREEDY, "50%")) == tokens(ref)
    assert core.stats().kv_slots_used == 0 and not core.has_work


def test_seeded_sampling_reproduces_in_any_batch(make_core):
    core = make_core()
    p = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, top_k=50, seed=7, ignore_eos=True)
    alone = core.generate(PROMPTS[:1], p, "40%")[0].token_ids
    batch = core.generate(PROMPTS, [p, GREEDY, p, GREEDY], ["40%", "dense", "2:4", "70%"])
    assert batch[0].token_ids == alone
    assert core.generate(PROMPTS[:1], SamplingParams(**{**vars(p), "seed": 8}), "40%")[0].token_ids != alone


def test_stop_string_across_token_boundaries(make_core, em):
    core = make_core()
    full = core.generate(PROMPTS[:1], GREEDY, "dense")[0]
    ids = full.token_ids
    pieces = [em.tokenizer.decode(ids[:i]) for i in range(len(ids) + 1)]
    # a stop string starting inside token 3 and ending inside a later token
    i = next(k for k in range(3, len(ids)) if len(pieces[k + 1]) - len(pieces[k]) >= 2)
    start = len(pieces[i]) + 1
    j = next(k for k in range(i + 1, len(ids)) if len(pieces[k + 1]) - len(pieces[k]) >= 2)
    stop = full.finish.text[start:len(pieces[j]) + 1]
    g = core.generate(PROMPTS[:1], SamplingParams(**{**vars(GREEDY), "stop": (stop,)}), "dense")[0]
    assert g.finish.finish_reason == "stop" and g.finish.text == full.finish.text[:start]
    assert g.token_ids == ids[:j + 1]  # the token completing the stop string is the last one
    assert "".join(e.text for e in g.events if isinstance(e, TokenEvent)) == g.finish.text
    assert not any(stop[:2] in e.text for e in g.events[:-1])  # no piece of it was streamed


def test_stop_token_ids_and_eos(make_core):
    core = make_core()
    ids = core.generate(PROMPTS[:1], GREEDY, "dense")[0].token_ids
    g = core.generate(PROMPTS[:1], SamplingParams(**{**vars(GREEDY), "stop_token_ids": (ids[4],)}), "dense")[0]
    k = ids.index(ids[4])
    assert g.token_ids == ids[:k] and g.finish.finish_reason == "stop" and g.finish.completion_tokens == k


def test_logprobs(make_core):
    core = make_core()
    g = core.generate(PROMPTS[:2], [SamplingParams(**{**vars(GREEDY), "logprobs": 3}), GREEDY], "30%")
    events = [e for e in g[0].events if isinstance(e, TokenEvent)]
    for e in events:
        lp = e.logprob
        assert lp.token_id == e.token_id and len(lp.top) == 3 and lp.top[0][0] == e.token_id  # greedy: the top
        assert lp.logprob == pytest.approx(lp.top[0][2]) and lp.logprob <= 0
        assert [t[2] for t in lp.top] == sorted((t[2] for t in lp.top), reverse=True)
    assert all(e.logprob is None for e in g[1].events if isinstance(e, TokenEvent))


def test_timings_and_finish_event(make_core):
    g = make_core().generate(PROMPTS[:1], GREEDY, None)[0]
    f = g.finish
    assert isinstance(f, FinishEvent) and f.tier == "dense" and f.completion_tokens == 12
    assert f.prompt_tokens > 0 and 0 <= f.timings.queue <= f.timings.ttft <= f.timings.e2e
    assert len(f.timings.inter_token) == 11 and all(t >= 0 for t in f.timings.inter_token)
    assert [e.index for e in g.events[:-1]] == list(range(12))


def test_requests_rejected_at_submit(make_core):
    core = make_core(max_seq_len=64)
    with pytest.raises(PromptTooLongError, match="exceeds the model's context of 64"):
        core.add("x", SamplingParams(max_tokens=64), None, print)
    with pytest.raises(UnknownTierError, match="'90%'"):
        core.add("x", GREEDY, "90%", print)
    assert not core.has_work
    (g,) = core.generate(["x"], SamplingParams(max_tokens=0), "2:4")
    assert g.finish.finish_reason == "length" and g.finish.tier == "2:4" and g.token_ids == []


def test_load_policy_switches_auto_tiers_and_back(make_core):
    policy = PolicySpec(mode="load", ladder=((3, "50%"), (6, "2:4")), hysteresis=1)
    core = make_core(max_batch=2, policy=policy)
    p = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    gens = core.generate(PROMPTS * 2, p, [None] * 7 + ["dense"])
    tiers = [g.finish.tier for g in gens]
    assert tiers[:2] == ["2:4", "2:4"]  # load 8 at the first admission
    assert tiers[-1] == "dense"  # explicit tier wins
    assert "50%" in tiers[2:7]  # load fell under 6 - 1 while requests were still queued
    (alone,) = core.generate(PROMPTS[:1], p, None)  # load 1 < 3 - 1: back to the default
    assert alone.finish.tier == "dense" and core.stats().current_auto_tier == "dense"
    core.set_policy(PolicySpec(default_tier="0.3"))
    assert core.generate(PROMPTS[:1], p, "auto")[0].finish.tier == "30%"
    with pytest.raises(ValueError, match="must increase"):
        core.set_policy(PolicySpec(mode="load", ladder=((3, "50%"), (2, "2:4"))))
    assert core.policy.spec.default_tier == "30%"  # a rejected policy changes nothing


def test_abort_frees_the_slot_and_reports_cancelled(make_core):
    core = make_core(max_batch=1)
    events = []
    rid = core.add(PROMPTS[0], SamplingParams(max_tokens=50, temperature=0.0), "dense", events.append)
    core.step()
    core.step()
    assert core.stats().kv_slots_used == 1
    assert core.abort(rid) and core.stats().kv_slots_used == 0 and not core.has_work
    assert events[-1].finish_reason == "cancelled" and len(events) == 3  # 2 tokens, then the finish
    assert not core.abort(rid)
