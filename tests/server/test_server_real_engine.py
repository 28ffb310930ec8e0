"""End to end against the real AsyncEngine on the embedded model (CPU): the HTTP path returns exactly what
the engine's static generate path computes, streams it, reports the tier and frees slots on disconnect."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import openai
import pytest
from conftest import REAL_MODEL, LiveServer
from sparsedial.server import ServerSettings, create_app

MODEL = REAL_MODEL  # conftest: the embedded elastic model, as real_engine loads it
PROMPT = "def fibonacci(n):"


@pytest.fixture
def real(real_engine):
    """A server per test (cheap) over the module's engine (loaded once)."""
    srv = LiveServer(create_app(ServerSettings(model=MODEL), engine=real_engine), real_engine).start()
    try:
        yield srv
    finally:
        srv.stop()


def test_greedy_completion_matches_engine_generate(real):
    from sparsedial.engine.generate import generate
    from sparsedial.engine.sampling import SamplingParams

    engine = real.engine
    with openai.OpenAI(base_url=f"{real.url}/v1", api_key="x", max_retries=0) as oai:
        r = oai.completions.create(model=engine.model_name, prompt=PROMPT, max_tokens=12, temperature=0,
                                   extra_body={"sparsity": "dense"})
        chunks = list(oai.completions.create(model=engine.model_name, prompt=PROMPT, max_tokens=12, temperature=0,
                                             stream=True, extra_body={"sparsity": "dense"}))
    (ref,) = generate(engine.model.model, engine.tokenizer, [PROMPT], SamplingParams(max_tokens=12, temperature=0))
    assert r.choices[0].text == ref.text and r.usage.completion_tokens == len(ref.tokens)
    assert r.model_extra["tier"] == "dense"
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text


def test_tiers_listed_and_unknown_tier_rejected(real):
    engine = real.engine
    ids = [m["id"] for m in httpx.get(f"{real.url}/v1/models").json()["data"]]
    assert ids == [engine.model_name] + [f"{engine.model_name}@{t}" for t in engine.tiers]
    r = httpx.post(f"{real.url}/generate", json={"prompt": PROMPT, "sparsity": "13:7"})
    assert r.status_code == 400 and "available" in r.json()["error"]["message"]
    last = engine.tiers[-1]
    r = httpx.post(f"{real.url}/generate", json={"prompt": PROMPT, "max_tokens": 3, "sparsity": last})
    assert r.status_code == 200 and r.json()["tier"] == last


def test_stream_disconnect_frees_the_slot(real):
    engine = real.engine

    async def scenario():
        async with httpx.AsyncClient(base_url=real.url, timeout=30) as client:
            body = {"prompt": PROMPT, "max_tokens": 500, "stream": True, "ignore_eos": True}
            async with client.stream("POST", "/generate", json=body) as r:
                async for _ in r.aiter_lines():
                    break  # one event, then hang up
        for _ in range(200):
            s = engine.stats()
            if s.running == 0 and s.waiting == 0:
                return s
            await asyncio.sleep(0.02)
        return engine.stats()

    s = asyncio.run(scenario())
    assert s.running == 0 and s.waiting == 0 and s.kv_slots_used == 0


# ------------------------------------------------------------------ API conventions of vLLM / openai-python
def test_models_retrieve_and_max_model_len(real):
    engine = real.engine
    name = engine.model_name
    with openai.OpenAI(base_url=f"{real.url}/v1", api_key="x", max_retries=0) as oai:
        assert oai.models.retrieve(name).id == name
        pinned = oai.models.retrieve(f"{name}@50%")
        assert pinned.model_extra["tier"] == "50%" and pinned.model_extra["parent"] == name
        with pytest.raises(openai.NotFoundError):
            oai.models.retrieve("nope")
    cards = httpx.get(f"{real.url}/v1/models").json()["data"]
    assert {c["max_model_len"] for c in cards} == {engine.max_context}


def test_tokenize_and_detokenize_use_the_engine_tokenizer(real):
    engine = real.engine
    text = "def fibonacci(n):\n    return n  # é"
    r = httpx.post(f"{real.url}/tokenize", json={"model": engine.model_name, "prompt": text}).json()
    assert r["tokens"] == engine.tokenizer.encode(text, add_special_tokens=False)  # independent: HF tokenizer
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == engine.max_context
    back = httpx.post(f"{real.url}/detokenize", json={"tokens": r["tokens"]}).json()
    assert back["prompt"] == text
    bad = httpx.post(f"{real.url}/detokenize", json={"tokens": [engine.vocab_size]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert httpx.post(f"{real.url}/tokenize", json={"model": "nope", "prompt": "x"}).status_code == 404


@pytest.mark.parametrize("field, neutral, other", [
    ("logit_bias", {}, {"50": 5.0}), ("best_of", 1, 3), ("suffix", "", "}"), ("min_tokens", 0, 4),
    ("repetition_penalty", 1.0, 1.2), ("response_format", {"type": "text"}, {"type": "json_object"}),
    ("tools", [], [{"type": "function", "function": {"name": "f"}}]), ("user", "u1", None),
])
def test_common_openai_fields_are_accepted_or_refused_cleanly(real, field, neutral, other):
    body = {"model": real.engine.model_name, "prompt": PROMPT, "max_tokens": 2, "temperature": 0}
    assert httpx.post(f"{real.url}/v1/completions", json={**body, field: neutral}).status_code == 200
    if other is not None:
        r = httpx.post(f"{real.url}/v1/completions", json={**body, field: other})
        assert r.status_code == 400 and r.json()["error"] == {
            **r.json()["error"], "param": field, "code": "unsupported_parameter"}


def test_api_key_and_cors(real_engine):
    app = create_app(ServerSettings(model=MODEL, api_key="k-123", allowed_origins=["http://ui.example"]),
                     engine=real_engine)
    with LiveServer(app, real_engine) as srv:
        body = {"model": real_engine.model_name, "prompt": PROMPT, "max_tokens": 2}
        assert httpx.post(f"{srv.url}/v1/completions", json=body).status_code == 401
        assert httpx.post(f"{srv.url}/generate", json={"prompt": "x", "max_tokens": 1}).status_code == 401
        with openai.OpenAI(base_url=f"{srv.url}/v1", api_key="k-123", max_retries=0) as oai:
            assert oai.completions.create(**body).usage.completion_tokens == 2
        with openai.OpenAI(base_url=f"{srv.url}/v1", api_key="wrong", max_retries=0) as oai:
            with pytest.raises(openai.AuthenticationError):
                oai.models.list()
        assert httpx.get(f"{srv.url}/health").status_code == 200  # probes need no key
        pre = httpx.options(f"{srv.url}/v1/completions", headers={
            "Origin": "http://ui.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://ui.example"
        other = httpx.options(f"{srv.url}/v1/completions", headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in other.headers


def test_metrics_label_endpoints_alike_and_carry_the_model_name(real):
    name = real.engine.model_name
    httpx.post(f"{real.url}/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 1})
    httpx.post(f"{real.url}/v1/completions", json={"model": name, "prompt": "x", "max_tokens": -1})
    text = httpx.get(f"{real.url}/metrics").text
    assert f'sparsedial_requests_total{{endpoint="/v1/completions",finish_reason="length",model_name="{name}"' in text
    assert f'sparsedial_request_errors_total{{endpoint="/v1/completions",model_name="{name}",status="400"}}' in text


def test_unknown_tier_error_mentions_whole_percents(real):
    r = httpx.post(f"{real.url}/generate", json={"prompt": "x", "sparsity": "95%"})
    assert "or any whole percent from 1% to 90%" in r.json()["error"]["message"]


def test_grafana_dashboard_queries_metrics_the_server_exports(real):
    """Every metric a panel of docker/grafana/sparsedial.json queries is one /metrics exports (with the
    model_name label the dashboard filters on), after a little traffic."""
    import json
    import re

    httpx.post(f"{real.url}/generate", json={"prompt": PROMPT, "max_tokens": 3, "sparsity": "50%"})
    httpx.post(f"{real.url}/generate", json={"prompt": PROMPT, "sparsity": "13:7"})
    exported = set(re.findall(r"^(sparsedial_\w+?)\{[^}]*model_name=", httpx.get(f"{real.url}/metrics").text,
                              re.MULTILINE))
    dash = json.loads((Path(__file__).resolve().parents[2] / "docker" / "grafana" / "sparsedial.json").read_text())
    queried = {m for p in dash["panels"] for t in p["targets"] for m in re.findall(r"sparsedial_\w+", t["expr"])}
    assert len(queried) >= 10 and queried <= exported, sorted(queried - exported)
