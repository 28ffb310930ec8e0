"""The TierBuilder on the real engine: a failing build fails only the requests waiting for that tier, and a
small on-demand cache serves any number of distinct tiers in turn (evicting only tiers nobody uses)."""

from __future__ import annotations

import asyncio

import pytest
from sparsedial.engine.api import FinishEvent, PolicySpec
from sparsedial.engine.sampling import SamplingParams

from .conftest import make_engine

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


async def _finish(engine, prompt: str, tier) -> FinishEvent:
    events = [ev async for ev in engine.submit(prompt, GREEDY, tier)]
    return events[-1]


@pytest.fixture(scope="module")
def small_cache():
    eng = make_engine(cache_tiers=1)
    yield eng
    eng.shutdown()


def test_a_failing_build_fails_only_its_requests(small_cache, monkeypatch):
    em = small_cache.model
    real = em.build_tier

    def build(name):
        if name == "47%":
            raise RuntimeError("injected build fault")
        return real(name)

    monkeypatch.setattr(em, "build_tier", build)

    async def scenario():
        return await asyncio.gather(_finish(small_cache, "import os", "47%"), _finish(small_cache, "x = ", "dense"),
                                    _finish(small_cache, "def f():", "48%"))

    bad, dense, other = asyncio.run(scenario())
    assert bad.finish_reason == "error" and "injected build fault" in bad.error and bad.tier == "47%"
    assert (dense.finish_reason, dense.completion_tokens) == ("length", 6)
    assert (other.finish_reason, other.tier, other.completion_tokens) == ("length", "48%", 6)
    assert small_cache.error is None


def test_one_cache_slot_serves_many_tiers_and_a_long_ladder(small_cache):
    tiers = [f"{p}%" for p in (33, 44, 55, 66, 77)]

    async def scenario():
        return [await _finish(small_cache, "print(", t) for t in tiers]

    done = asyncio.run(scenario())
    assert [(d.finish_reason, d.tier) for d in done] == [("length", t) for t in tiers]
    assert len(small_cache.model._cache) <= 1
    # a load ladder naming more on-demand tiers than the cache holds does not wedge auto requests
    small_cache.set_policy(PolicySpec(mode="load", default_tier="34%", ladder=((1, "45%"), (2, "56%"), (3, "67%"))))

    async def auto():
        return await asyncio.gather(*(_finish(small_cache, "for i in", None) for _ in range(6)))

    autos = asyncio.run(asyncio.wait_for(auto(), 120))
    assert all(a.finish_reason == "length" for a in autos)
    assert {a.tier for a in autos} <= {"34%", "45%", "56%", "67%"}
    small_cache.set_policy(PolicySpec())
