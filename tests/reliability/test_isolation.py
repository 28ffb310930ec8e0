"""One request can never hurt another (issue 10, items 1, 2 and 6, plus injected per-request failures).

Each test runs a victim (a greedy, ignore_eos request at an explicit tier, streamed) on the real engine over
real uvicorn, starts the hostile request(s) while the victim is in flight, and checks that the attacker got
a clear answer and that the victim's tokens are exactly those of the same request run alone.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from .conftest import token_ids

VICTIM = {"prompt": "def fibonacci(n):", "max_tokens": 120, "temperature": 0, "ignore_eos": True,
          "sparsity": "dense"}


class Victim:
    """A streamed victim request on a thread; `started` is set once its first token arrived."""

    def __init__(self, url: str, body: dict = VICTIM) -> None:
        self.url, self.body = url, body
        self.started = threading.Event()
        self.result: tuple[int, list[int], dict] | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.result = token_ids(self.url, self.body, timeout=120, on_token=lambda _: self.started.set())
        finally:
            self.started.set()

    def __enter__(self) -> Victim:
        self._thread.start()
        assert self.started.wait(60), "the victim never started"
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join(120)
        assert not self._thread.is_alive(), "the victim hung"

    def check(self, solo_ids: list[int]) -> None:
        status, ids, last = self.result
        assert status == 200 and last.get("finish_reason") == "length", last
        assert ids == solo_ids, "the victim's tokens changed because of another request"


@pytest.mark.parametrize("temperature", [1e-38, 1e-300, 5e-324, 1e-6])
def test_tiny_temperature_is_greedy_and_harms_nobody(server, solo, temperature):
    """Item 1: logits / 1e-38 overflow to inf, softmax gives NaN, and the engine loop died with every request
    in flight. Below 1e-5 is greedy (as vLLM); the attacker gets exactly the greedy tokens."""
    ref = solo(VICTIM)
    greedy = solo({"prompt": "x", "max_tokens": 4, "temperature": 0, "sparsity": "dense"})
    with Victim(server.url) as v:
        status, ids, last = token_ids(server.url, {"prompt": "x", "max_tokens": 4, "temperature": temperature,
                                                   "sparsity": "dense"})
    v.check(ref)
    assert status == 200 and ids == greedy[:len(ids)] and last["finish_reason"] in ("length", "stop")


@pytest.mark.parametrize("bad", [10**9, -1, 6144, 2**63])
def test_out_of_vocabulary_ids_are_a_400_for_that_request_only(server, solo, engine, bad):
    """Item 2: ids outside [0, vocab) indexed past the embedding: 500 for every request of the batch."""
    assert engine.core.vocab_size == 6144  # the embedded model's vocabulary: 6144 is one past the end
    ref = solo(VICTIM)
    with Victim(server.url) as v:
        r = httpx.post(f"{server.url}/generate", json={"prompt": [5, bad], "max_tokens": 2})
        lp = httpx.post(f"{server.url}/v1/completions", json={"model": engine.model_name, "prompt": [5, bad],
                                                               "echo": True, "logprobs": 1, "max_tokens": 0})
    v.check(ref)
    for resp in (r, lp):
        assert resp.status_code == 400, resp.text
        assert "outside the vocabulary" in resp.json()["error"]["message"]


def test_a_failing_forward_fails_only_its_request(server, solo, engine, monkeypatch):
    """A forward that raises for one row (injected: any batch holding token POISON) fails that request with a
    500 naming the error; the batch is re-run row by row, so the victim's tokens are its solo tokens."""
    ref = solo(VICTIM)
    poison = 4321
    model = engine.model.model
    real_forward = model.forward

    def forward(tokens, *args, **kwargs):
        if (tokens == poison).any():
            raise RuntimeError("injected fault")
        return real_forward(tokens, *args, **kwargs)

    assert poison not in ref
    monkeypatch.setattr(model, "forward", forward)
    with Victim(server.url) as v:
        r = httpx.post(f"{server.url}/generate", json={"prompt": [7, poison, 9], "max_tokens": 3,
                                                       "sparsity": "dense"}, timeout=60)
    v.check(ref)
    assert r.status_code == 500 and "injected fault" in r.json()["error"]["message"]
    assert engine.error is None and httpx.get(f"{server.url}/health").status_code == 200


def test_non_finite_logits_fail_only_that_request(server, solo, engine, monkeypatch):
    """A row whose logits come out NaN (injected for batches holding token POISON) fails alone."""
    ref = solo(VICTIM)
    poison = 4322
    model = engine.model.model
    real_forward = model.forward

    def forward(tokens, *args, **kwargs):
        out = real_forward(tokens, *args, **kwargs)
        rows = (tokens == poison).any(-1)
        return torch.where(rows[:, None], torch.full_like(out, float("nan")), out)

    monkeypatch.setattr(model, "forward", forward)
    with Victim(server.url) as v:
        r = httpx.post(f"{server.url}/generate", json={"prompt": [7, poison], "max_tokens": 3,
                                                       "sparsity": "dense"}, timeout=60)
    v.check(ref)
    assert r.status_code == 500 and "non-finite logits" in r.json()["error"]["message"]


def test_on_demand_tiers_are_built_off_the_model_thread(server, solo, engine, monkeypatch):
    """Item 6: each distinct unlisted tier was materialized on the model thread while everyone waited. Now
    a builder thread makes them (spied on here), at most cache_tiers stay cached, and every request gets
    its own tier while the victim decodes unharmed."""
    ref = solo(VICTIM)
    em = engine.model
    threads: list[str] = []
    real_build = em.build_tier

    def spy(name):
        threads.append(threading.current_thread().name)
        return real_build(name)

    monkeypatch.setattr(em, "build_tier", spy)
    tiers = [f"{p}%" for p in range(31, 40)]
    with Victim(server.url) as v, ThreadPoolExecutor(len(tiers)) as pool:
        def one(t):
            return httpx.post(f"{server.url}/generate", json={"prompt": "import os", "max_tokens": 2,
                                                              "sparsity": t}, timeout=120)
        answers = list(pool.map(one, tiers))
    v.check(ref)
    assert [a.status_code for a in answers] == [200] * len(tiers)
    assert [a.json()["tier"] for a in answers] == tiers
    assert threads and set(threads) == {"sparsedial-tier-builder"}
    assert len(em._cache) <= max(1, em.cache_tiers)


def test_engine_loop_failure_fails_health_and_requests_with_an_error(serve, caplog):
    """A failure outside any one request (injected into scheduling) fails what is in flight with an error
    (not 'cancelled'), is logged once, refuses new work with 503 and turns /health to 503 'failed'."""
    from .conftest import make_engine

    eng = make_engine()
    try:
        srv = serve(eng)
        real_schedule, calls = eng.core.schedule, []

        def schedule():
            calls.append(1)
            if len(calls) == 5:
                raise RuntimeError("injected scheduler fault")
            return real_schedule()

        eng.core.schedule = schedule
        with caplog.at_level("ERROR", logger="sparsedial.engine"):
            r = httpx.post(f"{srv.url}/generate", json={**VICTIM, "max_tokens": 50}, timeout=60)
        assert r.status_code == 500 and "injected scheduler fault" in r.json()["error"]["message"]
        assert sum("engine loop failed" in rec.message for rec in caplog.records) == 1
        health = httpx.get(f"{srv.url}/health")
        assert health.status_code == 503 and health.json()["status"] == "failed"
        again = httpx.post(f"{srv.url}/generate", json={"prompt": "x", "max_tokens": 1})
        assert again.status_code == 503
    finally:
        eng.shutdown()
