"""lm-eval's loglikelihood request (`echo`, `logprobs`, `max_tokens` 0) through openai-python against the real
server and AsyncEngine on the embedded elastic model (CPU)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import openai
import pytest
import torch
from conftest import LiveServer
from sparsedial.server import ServerSettings, create_app

MODELS = Path(__file__).resolve().parents[2] / "models"
MODEL = MODELS / "stdlib-tiny-elastic" if (MODELS / "stdlib-tiny-elastic" / "elastic.json").is_file() \
    else MODELS / "stdlib-tiny"
PROMPT = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1)"


@pytest.fixture
def real():
    from sparsedial.engine.async_engine import AsyncEngine
    from sparsedial.engine.runner import EngineConfig

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # 2-core CI machine (see tests/engine/conftest.py)
    engine = AsyncEngine(EngineConfig(model=MODEL, device="cpu", max_batch=2, max_seq_len=256,
                                      resident_tiers=("dense",)))  # other tiers materialize on first use
    srv = LiveServer(create_app(ServerSettings(model=MODEL), engine=engine), engine).start()
    try:
        yield srv
    finally:
        srv.stop()
        engine.shutdown()
        torch.set_num_threads(before)


def test_echo_logprobs_max_tokens_0_scores_the_prompt(real):
    engine = real.engine
    sparse = engine.tiers[-1]
    with openai.OpenAI(base_url=f"{real.url}/v1", api_key="x", max_retries=0) as oai:
        r = oai.completions.create(model=engine.model_name, prompt=PROMPT, echo=True, logprobs=2, max_tokens=0)
        s = oai.completions.create(model=f"{engine.model_name}@{sparse}", prompt=PROMPT, echo=True, logprobs=2,
                                   max_tokens=0)
        g = oai.completions.create(model=engine.model_name, prompt=PROMPT, echo=True, logprobs=1, max_tokens=1,
                                   temperature=0)
    ids = engine.tokenizer.encode(PROMPT, add_special_tokens=False)
    for resp, tier in ((r, "dense"), (s, sparse)):
        (c,) = resp.choices
        lp = c.logprobs
        assert resp.model_extra["tier"] == tier and c.text == PROMPT and "".join(lp.tokens) == PROMPT
        assert resp.usage.prompt_tokens == len(ids) and resp.usage.completion_tokens == 0
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]
        assert all(len(top) <= 2 for top in lp.top_logprobs[1:])
        want = asyncio.run(engine.prompt_logprobs(PROMPT, tier))
        assert lp.token_logprobs[1:] == pytest.approx([x.logprob for x in want.logprobs[1:]], abs=1e-5)
    assert r.choices[0].logprobs.token_logprobs[1:] != pytest.approx(s.choices[0].logprobs.token_logprobs[1:])
    # lm-eval's default (max_tokens 1): the prompt's logprobs, then the generated token's
    (c,) = g.choices
    assert c.logprobs.token_logprobs[:-1] == pytest.approx(r.choices[0].logprobs.token_logprobs, abs=1e-5)
    assert len(c.logprobs.tokens) == len(ids) + 1 and c.text == PROMPT + c.logprobs.tokens[-1]
