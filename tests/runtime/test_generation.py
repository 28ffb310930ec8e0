"""Generation on the embedded model: greedy is deterministic, seeded sampling reproduces, batching is exact."""

from __future__ import annotations

import pytest
import torch
from sparsedial.engine.sampling import SamplingParams, filter_logits, select_token

from sparsedial.testing import generate

PROMPTS = ["def fibonacci(n):", "import os\n\n\nclass ", "    for i in range(", "#"]


def test_greedy_is_deterministic(embedded):
    p = SamplingParams(max_tokens=24, temperature=0.0)
    a = generate(embedded.model, embedded.tokenizer, PROMPTS[:2], p)
    b = generate(embedded.model, embedded.tokenizer, PROMPTS[:2], p)
    assert [c.tokens for c in a] == [c.tokens for c in b]
    assert all(len(c.tokens) == 24 and c.finish_reason == "length" for c in a)


def test_greedy_batch_equals_one_at_a_time(embedded):
    p = SamplingParams(max_tokens=16, temperature=0.0)
    batched = generate(embedded.model, embedded.tokenizer, PROMPTS, p)
    for prompt, c in zip(PROMPTS, batched):
        (alone,) = generate(embedded.model, embedded.tokenizer, [prompt], p)
        assert alone.tokens == c.tokens, prompt


def test_seeded_sampling_reproduces_and_seeds_differ(embedded):
    def run(seed, prompts):
        p = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.95, top_k=50, seed=seed)
        return [c.tokens for c in generate(embedded.model, embedded.tokenizer, prompts, p)]

    first = run(7, PROMPTS[:1])
    assert run(7, PROMPTS[:1]) == first
    # the same seeded request reproduces inside a batch with other requests
    assert run(7, PROMPTS[:1] + PROMPTS[2:3])[0] == first[0]
    assert run(8, PROMPTS[:1]) != first


def test_stop_string_cuts_text(embedded):
    p = SamplingParams(max_tokens=60, temperature=0.0, stop=("\n",))
    (c,) = generate(embedded.model, embedded.tokenizer, ["def add(a, b):"], p)
    assert c.finish_reason == "stop" and "\n" not in c.text


def test_max_tokens_zero_and_context_limit(embedded):
    (c,) = generate(embedded.model, embedded.tokenizer, ["x = 1"], SamplingParams(max_tokens=0))
    assert c.tokens == [] and c.text == ""
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate(embedded.model, embedded.tokenizer, ["x"], SamplingParams(max_tokens=5000))


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_tokens=-1), "max_tokens"), (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(top_k=-3), "top_k"), (dict(logprobs=21), "logprobs"), (dict(stop=("",)), "stop"),
])
def test_sampling_params_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.isinf(filter_logits(logits, top_k=2, top_p=1.0)).tolist() == [False, False, True, True]
    # nucleus 0.7: 0.5 alone is below it, 0.5 + 0.3 reaches it -> two tokens stay
    assert torch.isinf(filter_logits(logits, top_k=0, top_p=0.7)).tolist() == [False, False, True, True]
    assert torch.isinf(filter_logits(logits, top_k=0, top_p=0.5)).tolist() == [False, True, True, True]
    g = torch.Generator().manual_seed(0)
    picks = {select_token(logits, SamplingParams(temperature=1.0, top_k=2), g) for _ in range(200)}
    assert picks == {0, 1}
