"""The OpenAI-compatible endpoints on the real engine, driven by the official `openai` package (unmodified) and
by raw SSE: models, completions, chat, streaming, n / prompt batches, echo + prompt logprobs (lm-eval),
tokenize, API key and CORS, the field conventions of vLLM / openai-python. Dense answers are checked against
transformers, sparse and sampled ones against the engine's own submit for the same request."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from conftest import CONTEXT, MODEL_NAME, TIERS
from reference import decode, direct, encode, hf_greedy, hf_logprobs, sse_payloads

PROMPT = "def fibonacci(n):"
LONG_PROMPT = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1)"


@pytest.fixture
def oai(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
        yield client


def test_models_lists_model_and_tier_ids_with_parent(oai, server):
    models = oai.models.list().data
    assert [m.id for m in models] == [MODEL_NAME] + [f"{MODEL_NAME}@{t}" for t in TIERS]
    assert models[0].parent is None
    assert all(m.parent == MODEL_NAME and m.tier == m.id.split("@")[1] for m in models[1:])
    cards = httpx.get(f"{server.url}/v1/models").json()["data"]
    assert {c["max_model_len"] for c in cards} == {CONTEXT}


def test_models_retrieve(oai):
    assert oai.models.retrieve(MODEL_NAME).id == MODEL_NAME
    pinned = oai.models.retrieve(f"{MODEL_NAME}@50%")
    assert pinned.model_extra["tier"] == "50%" and pinned.model_extra["parent"] == MODEL_NAME
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("nope")


def test_greedy_completion_matches_transformers(oai):
    want = decode(hf_greedy(PROMPT, 12))
    r = oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0,
                               extra_body={"sparsity": "dense"})
    chunks = list(oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0,
                                         stream=True, extra_body={"sparsity": "dense"}))
    assert r.choices[0].text == want and r.usage.completion_tokens == 12 and r.model_extra["tier"] == "dense"
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want


def test_completion_with_sparsity_extra_body(oai, engine):
    ref = direct(engine, "def f(", "50%", max_tokens=4, temperature=0)
    r = oai.completions.create(model=MODEL_NAME, prompt="def f(", max_tokens=4, temperature=0,
                               extra_body={"sparsity": "50%"})
    assert r.choices[0].text == ref.text and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(encode("def f(")) and r.usage.completion_tokens == 4
    assert r.model_extra["tier"] == "50%"


def test_tier_by_model_id(oai, engine):
    ref = direct(engine, PROMPT, "2:4", max_tokens=2, temperature=0)
    r = oai.completions.create(model=f"{MODEL_NAME}@2:4", prompt=PROMPT, max_tokens=2, temperature=0)
    assert r.model_extra["tier"] == "2:4" and r.model == f"{MODEL_NAME}@2:4" and r.choices[0].text == ref.text
    chat_prompt = "user: hi\n\nassistant:"  # the fallback template (server/chat.py; the model has none)
    ref = direct(engine, chat_prompt, "30%", max_tokens=2, temperature=0)
    c = oai.chat.completions.create(model=f"{MODEL_NAME}@30%", messages=[{"role": "user", "content": "hi"}],
                                    max_tokens=2, temperature=0)
    assert c.model_extra["tier"] == "30%" and c.choices[0].message.content == ref.text
    r = oai.completions.create(model=f"{MODEL_NAME}@45%", prompt=PROMPT, max_tokens=2, temperature=0)
    assert r.model_extra["tier"] == "45%"  # an in-between tier by model id too


def test_model_id_and_field_must_agree(oai):
    with pytest.raises(openai.BadRequestError, match="conflicts"):
        oai.completions.create(model=f"{MODEL_NAME}@2:4", prompt="x", max_tokens=2, extra_body={"sparsity": "dense"})


def test_completion_stream_with_usage_chunk(oai):
    want = decode(hf_greedy(PROMPT, 3))
    chunks = list(oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=3, stream=True, temperature=0,
                                         stream_options={"include_usage": True}, extra_body={"sparsity": "dense"}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    assert chunks[-1].usage.prompt_tokens == len(encode(PROMPT))


def test_chat_stream_role_then_content_then_finish(oai):
    want = decode(hf_greedy("user: q\n\nassistant:", 3))
    chunks = list(oai.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "q"}],
                                              max_tokens=3, stream=True, temperature=0))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].model_extra["tier"] == "dense"


def test_chat_uses_fallback_template_and_default_max_tokens(oai):
    """No max_tokens: the rest of the context. A long system message leaves 5 tokens of a 1024-token context."""
    def rendered(s: str) -> str:  # server/chat.py's fallback template
        return f"system: {s}\n\nuser: U\n\nassistant:"

    system = "x = 1\n" * 200
    n = len(encode(rendered(system)))
    while n + 5 < CONTEXT:  # grow the system message until 5 tokens (or a few more) are left
        system += " x"
        n = len(encode(rendered(system)))
    assert CONTEXT - 8 <= n < CONTEXT
    c = oai.chat.completions.create(model=MODEL_NAME, temperature=0, messages=[
        {"role": "system", "content": system}, {"role": "user", "content": "U"}])
    assert c.usage.prompt_tokens == n
    want = hf_greedy(rendered(system), CONTEXT - n)
    assert c.choices[0].message.content == decode(want)
    if len(want) == CONTEXT - n:  # no end-of-sequence token before the context is full
        assert c.choices[0].finish_reason == "length" and c.usage.completion_tokens == CONTEXT - n


def test_chat_logprobs(oai):
    prompt = encode("user: q\n\nassistant:")
    want = hf_greedy(prompt, 2)
    ref = hf_logprobs(prompt + want)[len(prompt) - 1:]
    c = oai.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "q"}], temperature=0,
                                    max_tokens=2, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert [t.token for t in content] == [decode([t]) for t in want]
    for k, t in enumerate(content):
        assert t.logprob == pytest.approx(ref[k, want[k]].item(), abs=1e-3)
        assert [x.token for x in t.top_logprobs] == [decode([i]) for i in ref[k].topk(2).indices.tolist()]
        assert t.bytes == list(t.token.encode())


def test_n_choices_and_prompt_batch(oai, engine):
    """Choice j of a seeded request is sampled with seed + j, for each prompt."""
    r = oai.completions.create(model=MODEL_NAME, prompt=["def", "class A"], max_tokens=3, n=2, seed=5,
                               temperature=1.0, extra_body={"sparsity": "dense"})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    want = [direct(engine, p, "dense", max_tokens=3, temperature=1.0, seed=s)
            for p in ("def", "class A") for s in (5, 6)]
    assert [c.text for c in r.choices] == [w.text for w in want]
    assert r.usage.prompt_tokens == len(encode("def")) + len(encode("class A"))
    assert r.usage.completion_tokens == sum(len(w.token_ids) for w in want)


def test_raw_sse_ends_with_done(server):
    body = {"model": MODEL_NAME, "prompt": "x", "max_tokens": 2, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as r:
        raw = r.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    assert all(e.startswith("data: ") for e in raw.split("\n\n") if e)
    first = sse_payloads(raw)[0]
    assert first["object"] == "text_completion"


def test_echo_logprobs_max_tokens_0_scores_the_prompt(oai, engine):
    """lm-eval's loglikelihood request: echo, logprobs, max_tokens 0, at dense (vs transformers) and a sparse tier
    (vs the engine's own prompt scoring)."""
    import asyncio

    ids = encode(LONG_PROMPT)
    ref = hf_logprobs(ids)
    sparse = TIERS[-1]
    r = oai.completions.create(model=MODEL_NAME, prompt=LONG_PROMPT, echo=True, logprobs=2, max_tokens=0)
    s = oai.completions.create(model=f"{MODEL_NAME}@{sparse}", prompt=LONG_PROMPT, echo=True, logprobs=2,
                               max_tokens=0)
    for resp, tier in ((r, "dense"), (s, sparse)):
        (c,) = resp.choices
        lp = c.logprobs
        assert resp.model_extra["tier"] == tier and c.text == LONG_PROMPT and "".join(lp.tokens) == LONG_PROMPT
        assert resp.usage.prompt_tokens == len(ids) and resp.usage.completion_tokens == 0
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]
        assert all(len(top) <= 2 for top in lp.top_logprobs[1:])
    want = [ref[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert r.choices[0].logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-3)
    best = ref[:-1].topk(2)  # position i + 1: the two likeliest tokens after the first i + 1
    for i, top in enumerate(r.choices[0].logprobs.top_logprobs[1:]):
        want_top = {decode([t]): v for t, v in zip(best.indices[i].tolist(), best.values[i].tolist())}
        assert top.keys() == want_top.keys() and list(top.values()) == pytest.approx(list(want_top.values()), abs=1e-3)
    scored = asyncio.run(engine.prompt_logprobs(LONG_PROMPT, sparse))
    assert s.choices[0].logprobs.token_logprobs[1:] == pytest.approx([x.logprob for x in scored.logprobs[1:]],
                                                                     abs=1e-5)
    assert r.choices[0].logprobs.token_logprobs[1:] != pytest.approx(s.choices[0].logprobs.token_logprobs[1:])


def test_echo_logprobs_with_generation_and_token_id_prompts(oai):
    """lm-eval's default (max_tokens 1, token-id prompts): the prompt's logprobs, then the generated token's."""
    ids = encode(PROMPT)
    ref = hf_logprobs(ids)
    nxt = hf_greedy(ids, 2)
    r = oai.completions.create(model=MODEL_NAME, prompt=[ids], max_tokens=0, echo=True, logprobs=1, temperature=0)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == PROMPT and lp.tokens == [decode([t]) for t in ids] and lp.token_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx([ref[i - 1, ids[i]].item() for i in range(1, len(ids))], abs=1e-3)
    assert list(lp.top_logprobs[1]) == [decode([int(ref[0].argmax())])]
    g = oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2, echo=True, logprobs=0, temperature=0)
    (c,) = g.choices
    assert c.text == PROMPT + decode(nxt)
    assert c.logprobs.tokens == [decode([t]) for t in ids + nxt]
    assert c.logprobs.token_logprobs[:len(ids)] == pytest.approx(lp.token_logprobs, abs=1e-5)
    assert c.logprobs.text_offset == [sum(len(t) for t in c.logprobs.tokens[:i]) for i in range(len(ids) + 2)]


class WithoutScoring:
    """The real engine without the optional prompt-scoring capability (api.SupportsPromptLogprobs)."""

    def __init__(self, engine) -> None:
        self._engine = engine

    def __getattr__(self, name: str):
        if name == "prompt_logprobs":
            raise AttributeError(name)
        return getattr(self._engine, name)


def test_echo_logprobs_without_engine_support_is_clear_400(serve, engine):
    srv = serve(WithoutScoring(engine))
    with openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0) as oai:
        with pytest.raises(openai.BadRequestError, match="prompt logprobs .* not supported"):
            oai.completions.create(model=MODEL_NAME, prompt="abc", max_tokens=0, echo=True, logprobs=1)
        assert oai.completions.create(model=MODEL_NAME, prompt="abc", max_tokens=1).usage.completion_tokens == 1


def test_unsupported_penalty_is_400(oai):
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        oai.completions.create(model=MODEL_NAME, prompt="x", presence_penalty=0.5)


@pytest.mark.parametrize("field, neutral, other", [
    ("logit_bias", {}, {"50": 5.0}), ("best_of", 1, 3), ("suffix", "", "}"), ("min_tokens", 0, 4),
    ("repetition_penalty", 1.0, 1.2), ("response_format", {"type": "text"}, {"type": "json_object"}),
    ("tools", [], [{"type": "function", "function": {"name": "f"}}]), ("user", "u1", None),
])
def test_common_openai_fields_are_accepted_or_refused_cleanly(server, field, neutral, other):
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 2, "temperature": 0}
    assert httpx.post(f"{server.url}/v1/completions", json={**body, field: neutral}).status_code == 200
    if other is not None:
        r = httpx.post(f"{server.url}/v1/completions", json={**body, field: other})
        assert r.status_code == 400 and r.json()["error"] == {
            **r.json()["error"], "param": field, "code": "unsupported_parameter"}


def test_tokenize_and_detokenize_use_the_model_tokenizer(server):
    text = "def fibonacci(n):\n    return n  # é"
    r = httpx.post(f"{server.url}/tokenize", json={"model": MODEL_NAME, "prompt": text}).json()
    assert r["tokens"] == encode(text)  # independent: the HF tokenizer loaded by the test
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == CONTEXT
    back = httpx.post(f"{server.url}/detokenize", json={"tokens": r["tokens"]}).json()
    assert back["prompt"] == text
    vocab = json.loads((server.engine.config.model / "config.json").read_text())["vocab_size"]
    bad = httpx.post(f"{server.url}/detokenize", json={"tokens": [vocab]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert httpx.post(f"{server.url}/tokenize", json={"model": "nope", "prompt": "x"}).status_code == 404


def test_api_key_and_cors(serve):
    srv = serve(api_key="k-123", allowed_origins=["http://ui.example"])
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 2}
    assert httpx.post(f"{srv.url}/v1/completions", json=body).status_code == 401
    assert httpx.post(f"{srv.url}/generate", json={"prompt": "x", "max_tokens": 1}).status_code == 401
    with openai.OpenAI(base_url=f"{srv.url}/v1", api_key="k-123", max_retries=0) as oai:
        assert oai.completions.create(**body).usage.completion_tokens == 2
    with (openai.OpenAI(base_url=f"{srv.url}/v1", api_key="wrong", max_retries=0) as oai,
          pytest.raises(openai.AuthenticationError)):
        oai.models.list()
    assert httpx.get(f"{srv.url}/health").status_code == 200  # probes need no key
    pre = httpx.options(f"{srv.url}/v1/completions", headers={
        "Origin": "http://ui.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://ui.example"
    other = httpx.options(f"{srv.url}/v1/completions", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in other.headers
