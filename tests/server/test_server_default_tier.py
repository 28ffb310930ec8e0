"""The server's default tier (`sparsedial serve --default-tier`, SPARSEDIAL_DEFAULT_TIER, ServerSettings.default_tier)
on the real engine: it serves the requests that ask for no tier or for `auto`, every endpoint's response names
it, an explicit tier still wins, and the admin API starts from it. (Refused values: tests/reliability.)"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import httpx
import openai
import pytest
from conftest import AUTH, MODEL_NAME, REAL_MODEL, wait_until
from reference import decode, direct, hf_greedy, sse_payloads
from sparsedial.engine.api import PolicySpec

PROMPT = "def fibonacci(n):"


def test_default_tier_serves_auto_and_absent_sparsity(serve, engine):
    srv = serve(default_tier="45%")
    ref = direct(engine, PROMPT, "45%", max_tokens=4, temperature=0)
    for extra in ({}, {"sparsity": "auto"}):
        body = httpx.post(f"{srv.url}/generate", json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0,
                                                         **extra}).json()
        assert body["tier"] == "45%" and body["text"] == ref.text
    dense = httpx.post(f"{srv.url}/generate", json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0,
                                                      "sparsity": "dense"}).json()
    assert dense["tier"] == "dense" and dense["text"] == decode(hf_greedy(PROMPT, 4))  # explicit tiers win
    with openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0) as oai:
        r = oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0)
        assert r.model_extra["tier"] == "45%" and r.choices[0].text == ref.text
        c = oai.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "q"}], max_tokens=2)
        assert c.model_extra["tier"] == "45%"
        chunks = list(oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2, stream=True))
        assert chunks[-1].model_extra["tier"] == "45%"
        scored = oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=0, echo=True, logprobs=0)
        assert scored.model_extra["tier"] == "45%"
    with httpx.stream("POST", f"{srv.url}/generate", json={"prompt": PROMPT, "max_tokens": 2, "stream": True}) as s:
        assert sse_payloads(s.iter_lines())[-2]["tier"] == "45%"
    state = httpx.get(f"{srv.url}/admin/tier", headers=AUTH).json()
    assert state["default_tier"] == "45%" and state["current_auto_tier"] == "45%"
    assert httpx.get(f"{srv.url}/status").json()["default_tier"] == "45%"


def test_default_tier_gauge_names_an_in_between_default(serve):
    srv = serve(default_tier="45%")
    text = httpx.get(f"{srv.url}/metrics").text
    assert f'sparsedial_default_tier{{model_name="{MODEL_NAME}",tier="45%"}} 1.0' in text
    assert f'sparsedial_auto_tier{{model_name="{MODEL_NAME}",tier="45%"}} 1.0' in text


def test_default_tier_from_the_environment(serve, engine, monkeypatch):
    monkeypatch.setenv("SPARSEDIAL_DEFAULT_TIER", "70%")
    srv = serve()  # ServerSettings() reads SPARSEDIAL_DEFAULT_TIER
    ref = direct(engine, PROMPT, "70%", max_tokens=3, temperature=0)
    body = httpx.post(f"{srv.url}/generate", json={"prompt": PROMPT, "max_tokens": 3, "temperature": 0}).json()
    assert body["tier"] == "70%" and body["text"] == ref.text
    engine.set_policy(PolicySpec())  # the shared engine's own default again (dense)
    monkeypatch.setenv("SPARSEDIAL_DEFAULT_TIER", "")  # empty = unset (compose files): the engine's default stays
    srv = serve()
    assert httpx.post(f"{srv.url}/generate", json={"prompt": PROMPT, "max_tokens": 1}).json()["tier"] == "dense"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_default_tier_flag_wins_over_the_environment():
    """`sparsedial serve --default-tier 45%` in its own process (it loads its own engine), with
    SPARSEDIAL_DEFAULT_TIER=70% in its environment: the flag wins."""
    port = _free_port()
    env = {**os.environ, "SPARSEDIAL_DEFAULT_TIER": "70%", "SPARSEDIAL_ADMIN_TOKEN": AUTH["Authorization"][7:],
           "OMP_NUM_THREADS": "1"}  # as conftest does in this process: a much faster load on a busy machine
    # -P: the checkout's own folders must not shadow the package being tested (a source-tree layout)
    cmd = [sys.executable, "-P", "-m", "sparsedial.cli", "serve", "--port", str(port), "--model", str(REAL_MODEL),
           "--device", "cpu", "--max-running", "1", "--default-tier", "45%", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            return True
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        assert wait_until(up, timeout=120, poll=0.2) and proc.poll() is None, proc.communicate()[1][-2000:]
        body = httpx.post(f"{url}/generate", json={"prompt": PROMPT, "max_tokens": 3, "temperature": 0},
                          timeout=60).json()
        assert body["tier"] == "45%" and body["usage"]["completion_tokens"] == 3
        assert httpx.get(f"{url}/admin/tier", headers=AUTH).json()["default_tier"] == "45%"
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
