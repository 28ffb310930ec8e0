"""The OpenAI-compatible endpoints, driven by the official `openai` package (unmodified) and by raw SSE."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from fake_engine import FakeScoringEngine


@pytest.fixture
def oai(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
        yield client


def test_models_lists_model_and_tier_ids_with_parent(oai):
    models = oai.models.list().data
    assert [m.id for m in models] == ["fake-model", "fake-model@dense", "fake-model@30%", "fake-model@50%",
                                      "fake-model@2:4"]
    assert models[0].parent is None
    assert all(m.parent == "fake-model" and m.tier == m.id.split("@")[1] for m in models[1:])


def test_completion_with_sparsity_extra_body(oai, engine):
    r = oai.completions.create(model="fake-model", prompt="def f(", max_tokens=4, extra_body={"sparsity": "50%"})
    assert r.choices[0].text == "abcd" and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == 6 and r.usage.completion_tokens == 4
    assert r.model_extra["tier"] == "50%" and engine.submitted[-1].tier == "50%"


def test_tier_by_model_id(oai, engine):
    r = oai.completions.create(model="fake-model@2:4", prompt="x", max_tokens=2)
    assert r.model_extra["tier"] == "2:4" and r.model == "fake-model@2:4"
    c = oai.chat.completions.create(model="fake-model@30%", messages=[{"role": "user", "content": "hi"}],
                                    max_tokens=2)
    assert c.model_extra["tier"] == "30%" and c.choices[0].message.content == "ab"


def test_model_id_and_field_must_agree(oai):
    with pytest.raises(openai.BadRequestError, match="conflicts"):
        oai.completions.create(model="fake-model@2:4", prompt="x", max_tokens=2, extra_body={"sparsity": "dense"})


def test_completion_stream_with_usage_chunk(oai):
    chunks = list(oai.completions.create(model="fake-model", prompt="x", max_tokens=3, stream=True,
                                         stream_options={"include_usage": True}, extra_body={"sparsity": "dense"}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "abc"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3


def test_chat_stream_role_then_content_then_finish(oai):
    chunks = list(oai.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "q"}],
                                              max_tokens=3, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "abc"
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].model_extra["tier"] == "dense"


def test_chat_uses_fallback_template_and_default_max_tokens(oai, engine):
    engine.eos_after = 2
    oai.chat.completions.create(model="fake-model", messages=[{"role": "system", "content": "S"},
                                                              {"role": "user", "content": "U"}])
    sub = engine.submitted[-1]
    # the server tokenizes off the event loop and submits token ids (the fake's ids are code points)
    assert engine.tokenizer.decode(sub.prompt) == "system: S\n\nuser: U\n\nassistant:"
    assert sub.params.max_tokens == engine.max_context - len(sub.prompt)


def test_chat_logprobs(oai):
    c = oai.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "q"}],
                                    max_tokens=2, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert [t.token for t in content] == ["a", "b"] and len(content[0].top_logprobs) == 2


def test_n_choices_and_prompt_batch(oai, engine):
    r = oai.completions.create(model="fake-model", prompt=["a", "bb"], max_tokens=2, n=2, seed=5)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [s.params.seed for s in engine.submitted[-4:]] == [5, 6, 5, 6]
    assert r.usage.prompt_tokens == 3 and r.usage.completion_tokens == 8


def test_raw_sse_ends_with_done(server):
    body = {"model": "fake-model", "prompt": "x", "max_tokens": 2, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as r:
        raw = r.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    assert all(e.startswith("data: ") for e in raw.split("\n\n") if e)
    first = json.loads(raw.split("\n\n")[0][6:])
    assert first["object"] == "text_completion"


def test_echo_logprobs_without_engine_support_is_clear_400(oai):
    with pytest.raises(openai.BadRequestError, match="prompt logprobs .* not supported"):
        oai.completions.create(model="fake-model", prompt="abc", max_tokens=0, echo=True, logprobs=1)


def test_echo_logprobs_for_lm_eval(serve):
    srv = serve(FakeScoringEngine())
    with openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0) as oai:
        r = oai.completions.create(model="fake-model", prompt=[[104, 105, 106]], max_tokens=0, echo=True,
                                   logprobs=1, temperature=0)
        lp = r.choices[0].logprobs
        assert r.choices[0].text == "hij"
        assert lp.tokens == ["h", "i", "j"] and lp.token_logprobs[0] is None
        assert lp.token_logprobs[1:] == [-1.0, -1.01] and lp.top_logprobs[1] == {"i": -1.0}
        assert lp.text_offset == [0, 1, 2]
        r = oai.completions.create(model="fake-model", prompt="hi", max_tokens=2, echo=True, logprobs=0)
        assert r.choices[0].text == "hiab" and r.choices[0].logprobs.tokens == ["h", "i", "a", "b"]
        assert r.choices[0].logprobs.text_offset == [0, 1, 2, 3]


def test_unsupported_penalty_is_400(oai):
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        oai.completions.create(model="fake-model", prompt="x", presence_penalty=0.5)
