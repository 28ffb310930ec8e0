"""AsyncEngine: streams, concurrency with mixed tiers, cancellation, overload, policy at run time.
(pytest-asyncio is not installed: each test drives its own loop with asyncio.run.)"""

from __future__ import annotations

import asyncio

import pytest
from sparsedial.engine.api import (
    EngineNotReadyError,
    EngineOverloadedError,
    EngineProtocol,
    FinishEvent,
    PolicySpec,
    TokenEvent,
)
from sparsedial.engine.sampling import SamplingParams

from .conftest import PROMPTS

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
LONG = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)


def test_streams_match_the_sync_engine_with_mixed_tiers(engine, make_core):
    eng = engine()
    assert isinstance(eng, EngineProtocol) and eng.tiers[-1] == "2:4" and eng.max_context == 256
    tiers = ["dense", "2:4", "60%", "45%"]

    async def main():
        streams = [eng.submit(p, GREEDY, t) for p, t in zip(PROMPTS, tiers)]
        return await asyncio.gather(*(s.collect() for s in streams))

    results = asyncio.run(main())
    want = make_core().generate(PROMPTS, GREEDY, tiers)
    for events, w in zip(results, want):
        assert isinstance(events[-1], FinishEvent) and all(isinstance(e, TokenEvent) for e in events[:-1])
        assert [e.token_id for e in events[:-1]] == w.token_ids and events[-1].text == w.finish.text
        assert events[-1].tier == w.finish.tier
        t = events[-1].timings
        assert t.ttft is not None and 0 <= t.queue <= t.ttft <= t.e2e and len(t.inter_token) == 9
    assert eng.stats().running == 0 and eng.stats().kv_slots_used == 0


def test_aclose_and_consumer_cancellation_free_the_slot_at_once(engine):
    eng = engine(max_batch=2)

    async def main():
        s = eng.submit(PROMPTS[0], LONG, "dense")
        first = await s.__anext__()
        assert isinstance(first, TokenEvent) and eng.stats().kv_slots_used == 1
        await s.aclose()
        assert eng.stats().kv_slots_used == 0 and eng.stats().running == 0

        s2 = eng.submit(PROMPTS[1], LONG, "30%")

        async def consume():
            async for _ in s2:
                pass

        task = asyncio.create_task(consume())
        while eng.stats().running == 0:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert eng.stats().kv_slots_used == 0 and eng.stats().waiting == 0
        # the engine keeps serving
        return await eng.submit(PROMPTS[2], GREEDY, "2:4").collect()

    events = asyncio.run(main())
    assert events[-1].finish_reason == "length" and len(events) == 11


def test_overload_is_rejected_at_submit(engine):
    eng = engine(max_batch=1, max_waiting=1, max_step_tokens=1)

    async def main():
        streams = [eng.submit(PROMPTS[0], LONG, "dense")]
        with pytest.raises(EngineOverloadedError, match="limit 1") as e:
            for _ in range(2):  # one slot + one waiting place: the third request at the latest is refused
                streams.append(eng.submit(PROMPTS[1], LONG, "dense"))
        assert e.value.retry_after > 0
        for s in streams:
            await s.aclose()
        assert eng.stats().running == eng.stats().waiting == 0

    asyncio.run(main())


def test_policy_at_run_time_and_explicit_tiers_win(engine):
    eng = engine()

    async def tier_of(tier=None):
        return (await eng.submit(PROMPTS[0], SamplingParams(max_tokens=1), tier).collect())[-1].tier

    assert asyncio.run(tier_of()) == "dense"
    eng.set_policy(PolicySpec(default_tier="2:4"))
    assert eng.get_policy().default_tier == "2:4" and eng.stats().current_auto_tier == "2:4"
    assert asyncio.run(tier_of("auto")) == "2:4" and asyncio.run(tier_of(0.4)) == "40%"
    assert eng.resolve_tier("50%").name == "50%" and eng.resolve_tier("auto") is None


def test_submit_after_shutdown(engine):
    eng = engine()
    eng.shutdown()

    async def main():
        eng.submit("x", GREEDY)

    with pytest.raises(EngineNotReadyError):
        asyncio.run(main())
