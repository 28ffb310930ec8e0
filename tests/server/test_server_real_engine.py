"""End to end against the real AsyncEngine on the embedded model (CPU): the HTTP path returns exactly what
the engine's static generate path computes, streams it, reports the tier and frees slots on disconnect."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import openai
import pytest
from conftest import LiveServer
from sparsedial.server import ServerSettings, create_app

MODELS = Path(__file__).resolve().parents[2] / "models"
MODEL = MODELS / "stdlib-tiny-elastic" if (MODELS / "stdlib-tiny-elastic" / "elastic.json").is_file() \
    else MODELS / "stdlib-tiny"
PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def real_engine():
    engine_mod = pytest.importorskip("sparsedial.engine.async_engine")
    from sparsedial.engine.runner import EngineConfig

    engine = engine_mod.AsyncEngine(EngineConfig(model=MODEL, device="cpu", max_batch=4))
    yield engine
    engine.shutdown()


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
