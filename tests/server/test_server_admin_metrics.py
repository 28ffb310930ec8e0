"""Admin tier control (auth, fixed/load policy, in-flight requests keep their tier), health and metrics."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from conftest import ADMIN_TOKEN
from fake_engine import FakeEngine
from sparsedial.clients import (
    AsyncSparseDial,
    AuthenticationError,
    BadRequestError,
    PermissionDeniedError,
    SparseDial,
)

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def test_admin_disabled_without_token_is_403(serve, engine):
    srv = serve(engine, admin_token=None)
    r = httpx.get(srv.url + "/admin/tier", headers=AUTH)
    assert r.status_code == 403 and "SPARSEDIAL_ADMIN_TOKEN" in r.json()["error"]["message"]
    with SparseDial(srv.url, admin_token=ADMIN_TOKEN, max_retries=0) as c, pytest.raises(PermissionDeniedError):
        c.admin.set_tier(default_tier="50%")


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": ADMIN_TOKEN},
                                     {"Authorization": f"Basic {ADMIN_TOKEN}"}])
def test_admin_wrong_or_missing_token_is_401(server, headers):
    for method in ("GET", "PUT"):
        r = httpx.request(method, server.url + "/admin/tier", headers=headers, json={"default_tier": "50%"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["type"] == "authentication_error"


def test_sdk_admin_round_trip(server, engine):
    with SparseDial(server.url, admin_token=ADMIN_TOKEN, max_retries=0) as c:
        state = c.admin.get_tier()
        assert state.default_tier == "dense" and state.policy.mode == "fixed" and state.tiers == engine.tiers
        state = c.admin.set_tier(default_tier="50%")
        assert state.default_tier == "50%" and engine.policy.default_tier == "50%"
        assert c.generate("x", max_tokens=1).tier == "50%"
        state = c.admin.set_tier(mode="load", ladder=[(4, "2:4"), (2, "30%")], hysteresis=1)
        assert [(s.threshold, s.tier) for s in state.policy.ladder] == [(2, "30%"), (4, "2:4")]
        assert state.default_tier == "50%" and state.policy.hysteresis == 1
        with pytest.raises(BadRequestError, match="unknown sparsity tier '45%'"):
            c.admin.set_tier(default_tier="45%")
        with pytest.raises(BadRequestError, match="not 'auto'"):
            c.admin.set_tier(default_tier="auto")
        with pytest.raises(BadRequestError, match="non-empty ladder"):
            c.admin.set_tier(mode="load", ladder=[])
    with SparseDial(server.url, admin_token="nope", max_retries=0) as c, pytest.raises(AuthenticationError):
        c.admin.get_tier()


def test_changing_default_keeps_in_flight_tier(serve):
    engine = FakeEngine(token_delay=0.01)
    srv = serve(engine)

    async def scenario():
        async with AsyncSparseDial(srv.url, admin_token=ADMIN_TOKEN, max_retries=0) as c:
            task = asyncio.create_task(c.generate("x", max_tokens=30))
            while engine.running == 0:
                await asyncio.sleep(0.005)
            await c.admin.set_tier(default_tier="2:4")
            first, second = await task, await c.generate("x", max_tokens=1)
        return first, second

    first, second = asyncio.run(scenario())
    assert first.tier == "dense" and first.usage.completion_tokens == 30
    assert second.tier == "2:4"


def test_load_policy_escalates_auto_tier(serve):
    engine = FakeEngine(token_delay=0.01, max_running=8)
    srv = serve(engine)

    async def scenario():
        async with AsyncSparseDial(srv.url, admin_token=ADMIN_TOKEN, max_retries=0) as c:
            await c.admin.set_tier(mode="load", ladder=[(3, "50%")])
            tasks = []
            for k in range(4):  # one at a time, so the load each request sees on admission is known
                tasks.append(asyncio.create_task(c.generate("x", max_tokens=200)))
                for _ in range(1000):
                    if engine.running == k + 1:
                        break
                    await asyncio.sleep(0.01)
            return [r.tier for r in await asyncio.gather(*tasks)]

    tiers = asyncio.run(scenario())
    # admitted at loads 1, 2, 3, 4 (the request itself included): the ladder's 3 switches to 50%
    assert tiers == ["dense", "dense", "50%", "50%"]


def test_health_ok(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_metrics_have_tier_labels_and_gauges(server, engine):
    with SparseDial(server.url, max_retries=0) as c:
        c.generate("x", max_tokens=3, sparsity="50%")
        c.completions.create(model="fake-model@2:4", prompt="x", max_tokens=2)
        with pytest.raises(BadRequestError):
            c.generate("x", sparsity="99%")
    text = httpx.get(server.url + "/metrics").text
    assert ('sparsedial_requests_total{endpoint="/generate",finish_reason="length",model_name="fake-model",'
            'tier="50%"} 1.0') in text
    assert ('sparsedial_requests_total{endpoint="/v1/completions",finish_reason="length",model_name="fake-model",'
            'tier="2:4"} 1.0') in text
    assert 'sparsedial_generation_tokens_total{model_name="fake-model",tier="50%"} 3.0' in text
    assert 'sparsedial_prompt_tokens_total{model_name="fake-model",tier="2:4"} 1.0' in text
    for hist in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds"):
        assert f'sparsedial_{hist}_count{{model_name="fake-model",tier="50%"}}' in text
    assert 'sparsedial_request_errors_total{endpoint="/generate",model_name="fake-model",status="400"} 1.0' in text
    assert 'sparsedial_num_requests_running{model_name="fake-model"} 0.0' in text
    assert 'sparsedial_num_requests_waiting{model_name="fake-model"} 0.0' in text
    assert 'sparsedial_default_tier{model_name="fake-model",tier="dense"} 1.0' in text
    assert 'sparsedial_default_tier{model_name="fake-model",tier="2:4"} 0.0' in text


def test_each_app_has_its_own_registry(serve):
    a, b = serve(FakeEngine()), serve(FakeEngine())
    httpx.post(a.url + "/generate", json={"prompt": "x", "max_tokens": 1})
    assert 'tier="dense"} 1.0' in httpx.get(a.url + "/metrics").text
    assert "sparsedial_requests_total{" not in httpx.get(b.url + "/metrics").text
