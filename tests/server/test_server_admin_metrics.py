"""Admin tier control on the real engine (auth, fixed and load policies on both load signals with hysteresis,
in-flight requests keep their tier), health and Prometheus metrics.

Load is held by streamed requests at an explicit tier ("holders", which bypass the policy but take KV slots
and count as requests) on an engine whose steps are slowed (reference.slowed), so they last as long as the
test needs; one-token `auto` "probes" then show the tier the policy gives at that load. The expected tiers
are worked out by hand from the policy's documented rule (engine/api.py PolicySpec): level i applies once
load >= threshold i; it steps back only when load < threshold - hysteresis; the load a request sees on
admission is the engine's load before it takes a slot (signal "kv": used slots / slots) or the requests in
the engine, itself included (signal "requests")."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import httpx
import pytest
from conftest import ADMIN_TOKEN, AUTH, MODEL_NAME, SLOTS, TIERS
from reference import direct, encode, slowed
from sparsedial.clients import (
    AsyncSparseDial,
    AuthenticationError,
    BadRequestError,
    PermissionDeniedError,
    SparseDial,
)

PROMPT = "def fibonacci(n):"


def test_admin_disabled_without_token_is_403(serve):
    srv = serve(admin_token=None)
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
    assert server.engine.get_policy().default_tier == "dense"


def test_sdk_admin_round_trip(server, engine):
    with SparseDial(server.url, admin_token=ADMIN_TOKEN, max_retries=0) as c:
        state = c.admin.get_tier()
        assert state.default_tier == "dense" and state.policy.mode == "fixed" and state.tiers == TIERS
        assert state.current_auto_tier == "dense"
        state = c.admin.set_tier(default_tier="50%")
        assert state.default_tier == "50%" and engine.get_policy().default_tier == "50%"
        r = c.generate(PROMPT, max_tokens=3, temperature=0)
        assert r.tier == "50%" and r.text == direct(engine, PROMPT, "50%", max_tokens=3, temperature=0).text
        state = c.admin.set_tier(mode="load", ladder=[(4, "2:4"), (2, "30%")], hysteresis=1)
        assert [(s.threshold, s.tier) for s in state.policy.ladder] == [(2, "30%"), (4, "2:4")]
        assert state.default_tier == "50%" and state.policy.hysteresis == 1 and state.policy.signal == "requests"
        state = c.admin.set_tier(mode="fixed", default_tier="45%")  # an in-between tier is a tier too
        assert state.default_tier == "45%" and c.generate(PROMPT, max_tokens=1).tier == "45%"
        with pytest.raises(BadRequestError, match="unknown sparsity tier '95%'"):
            c.admin.set_tier(default_tier="95%")
        with pytest.raises(BadRequestError, match="not 'auto'"):
            c.admin.set_tier(default_tier="auto")
        with pytest.raises(BadRequestError, match="non-empty ladder"):
            c.admin.set_tier(mode="load", ladder=[])
        with pytest.raises(BadRequestError, match=r"\[0, 1\]"):
            c.admin.set_tier(mode="load", signal="kv", ladder=[(2, "50%")])
        assert c.admin.get_tier().default_tier == "45%"  # refused updates changed nothing
    with SparseDial(server.url, admin_token="nope", max_retries=0) as c, pytest.raises(AuthenticationError):
        c.admin.get_tier()


def test_changing_default_keeps_in_flight_tier(server, engine):
    ref = direct(engine, PROMPT, "dense", max_tokens=30, temperature=0, ignore_eos=True)

    async def scenario():
        async with AsyncSparseDial(server.url, admin_token=ADMIN_TOKEN, max_retries=0) as c:
            task = asyncio.create_task(c.generate(PROMPT, max_tokens=30, temperature=0,
                                                  extra_body={"ignore_eos": True}))
            await until(lambda: engine.stats().running == 1)
            await c.admin.set_tier(default_tier="2:4")
            first, second = await task, await c.generate(PROMPT, max_tokens=1)
        return first, second

    with slowed(engine, 0.01):  # 30 steps: the policy changes while the first request decodes
        first, second = asyncio.run(scenario())
    assert first.tier == "dense" and first.usage.completion_tokens == 30 and first.text == ref.text
    assert second.tier == "2:4"


# ------------------------------------------------------------------------------------ load policies
async def until(pred, timeout: float = 30.0) -> None:
    for _ in range(int(timeout / 0.005)):
        if pred():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("timed out")


class Load:
    """Holders (streamed dense requests that hold a KV slot until cancelled) and auto probes, over HTTP."""

    def __init__(self, url: str, engine) -> None:
        self.engine, self.client = engine, httpx.AsyncClient(base_url=url, timeout=60)
        self.holders: list[asyncio.Task] = []
        self.events = 0  # SSE events the holders have received (about one per engine step)

    async def _hold(self) -> None:
        body = {"prompt": PROMPT, "max_tokens": 900, "ignore_eos": True, "stream": True, "sparsity": "dense"}
        async with self.client.stream("POST", "/generate", json=body) as r:
            async for line in r.aiter_lines():
                self.events += line.startswith("data: ")

    async def hold(self, n: int) -> None:
        """Add or cancel holders until `n` run; return once the engine runs exactly them."""
        while len(self.holders) < n:
            self.holders.append(asyncio.create_task(self._hold()))
            await until(lambda: self.engine.stats().running == len(self.holders))
        while len(self.holders) > n:
            task = self.holders.pop()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await until(lambda: self.engine.stats().running == n and self.engine.stats().waiting == 0)
        await self.steps(2)

    async def steps(self, n: int) -> None:
        """Wait until the holders have streamed `n` more tokens each (the policy is evaluated at every step)."""
        start, k = self.events, len(self.holders)
        await until(lambda: self.events >= start + n * k)

    async def probe(self) -> str:
        r = await self.client.post("/generate", json={"prompt": PROMPT, "max_tokens": 1, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()["tier"]

    async def auto_tier(self) -> str:
        return (await self.client.get("/admin/tier", headers=AUTH)).json()["current_auto_tier"]

    async def close(self) -> None:
        await self.hold(0)
        await self.client.aclose()


def run_load(server, engine, policy: dict, script) -> list:
    r = httpx.put(server.url + "/admin/tier", headers=AUTH, json=policy)
    assert r.status_code == 200, r.text

    async def scenario():
        load = Load(server.url, engine)
        try:
            return await script(load)
        finally:
            await load.close()

    with slowed(engine, 0.01):  # holders of 900 tokens then last >= 9 s
        return asyncio.run(scenario())


def test_kv_load_policy_moves_to_the_sparser_tier_and_back_with_hysteresis(server, engine):
    """signal "kv", ladder 0.5 -> 50%, hysteresis 0.3 (back below 0.2). A probe's load: holders / 4 slots."""
    assert SLOTS == 4
    policy = {"mode": "load", "signal": "kv", "ladder": [{"threshold": 0.5, "tier": "50%"}], "hysteresis": 0.3}

    async def script(load: Load) -> list:
        seen = []
        for n in (0, 1, 2, 3, 1, 0):  # KV use 0, .25, .5, .75, then back down to .25 and 0
            await load.hold(n)
            seen.append((n, await load.probe(), await load.auto_tier() if n else None))
        return seen

    seen = run_load(server, engine, policy, script)
    assert seen == [(0, "dense", None), (1, "dense", "dense"), (2, "50%", "50%"), (3, "50%", "50%"),
                    (1, "50%", "50%"),  # 0.25: under the 0.5 step but not under 0.5 - 0.3: stays (hysteresis)
                    (0, "dense", None)]  # 0 < 0.2: back to the default tier


def test_kv_load_policy_reports_the_default_tier_once_idle(server, engine):
    policy = {"mode": "load", "signal": "kv", "ladder": [{"threshold": 0.5, "tier": "50%"}], "hysteresis": 0.3}

    async def script(load: Load) -> list:
        await load.hold(3)
        busy = await load.auto_tier()
        await load.hold(0)
        return [busy, await load.auto_tier()]

    assert run_load(server, engine, policy, script) == ["50%", "dense"]


def test_kv_load_policy_without_hysteresis_steps_back_at_the_threshold(server, engine):
    policy = {"mode": "load", "signal": "kv", "ladder": [{"threshold": 0.5, "tier": "70%"}], "hysteresis": 0}

    async def script(load: Load) -> list:
        seen = []
        for n in (2, 1):
            await load.hold(n)
            seen.append(await load.probe())
        return seen

    assert run_load(server, engine, policy, script) == ["70%", "dense"]


def test_request_load_policy_escalates_auto_tier_with_hysteresis(server, engine):
    """signal "requests", ladder 3 -> 50%, hysteresis 1 (back below 2). A probe sees holders + itself; between
    probes the engine steps with the holders alone."""
    policy = {"mode": "load", "signal": "requests", "ladder": [{"threshold": 3, "tier": "50%"}], "hysteresis": 1}

    async def script(load: Load) -> list:
        seen = []
        for n in (0, 1, 2, 3):  # probes at loads 1, 2, 3, 4
            await load.hold(n)
            seen.append(await load.probe())
        await load.hold(2)  # holders alone: load 2, not below 3 - 1: stays
        seen.append(await load.auto_tier())
        await load.hold(1)  # load 1 < 2: back to the default
        seen.append(await load.auto_tier())
        return seen

    assert run_load(server, engine, policy, script) == ["dense", "dense", "50%", "50%", "50%", "dense"]


# ------------------------------------------------------------------------------------ health and metrics
def test_health_ok(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok", "model": MODEL_NAME, "tiers": TIERS,
                                                        "detail": None}


def test_metrics_have_tier_labels_and_gauges(server, engine):
    m = MODEL_NAME
    gen = direct(engine, PROMPT, "50%", max_tokens=3, temperature=0)
    cmp = direct(engine, "x", "2:4", max_tokens=2, temperature=0)
    with SparseDial(server.url, max_retries=0) as c:
        c.generate(PROMPT, max_tokens=3, sparsity="50%", temperature=0)
        c.completions.create(model=f"{m}@2:4", prompt="x", max_tokens=2, temperature=0)
        with pytest.raises(BadRequestError):
            c.generate("x", sparsity="99%")
    text = httpx.get(server.url + "/metrics").text
    assert (f'sparsedial_requests_total{{endpoint="/generate",finish_reason="{gen.finish_reason}",model_name="{m}",'
            'tier="50%"} 1.0') in text
    assert (f'sparsedial_requests_total{{endpoint="/v1/completions",finish_reason="{cmp.finish_reason}",'
            f'model_name="{m}",tier="2:4"}} 1.0') in text
    assert f'sparsedial_generation_tokens_total{{model_name="{m}",tier="50%"}} {len(gen.token_ids)}.0' in text
    assert f'sparsedial_prompt_tokens_total{{model_name="{m}",tier="2:4"}} {len(encode("x"))}.0' in text
    assert f'sparsedial_prompt_tokens_total{{model_name="{m}",tier="50%"}} {len(encode(PROMPT))}.0' in text
    for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert f'sparsedial_{hist}_count{{model_name="{m}",tier="50%"}} 1.0' in text
    assert f'sparsedial_inter_token_latency_seconds_count{{model_name="{m}",tier="50%"}} 2.0' in text  # 3 tokens
    assert f'sparsedial_request_errors_total{{endpoint="/generate",model_name="{m}",status="400"}} 1.0' in text
    assert f'sparsedial_num_requests_running{{model_name="{m}"}} 0.0' in text
    assert f'sparsedial_num_requests_waiting{{model_name="{m}"}} 0.0' in text
    assert f'sparsedial_kv_cache_usage_ratio{{model_name="{m}"}} 0.0' in text
    assert f'sparsedial_default_tier{{model_name="{m}",tier="dense"}} 1.0' in text
    assert f'sparsedial_default_tier{{model_name="{m}",tier="2:4"}} 0.0' in text
    assert f'sparsedial_auto_tier{{model_name="{m}",tier="dense"}} 1.0' in text


def test_metrics_label_endpoints_alike_and_carry_the_model_name(server):
    httpx.post(f"{server.url}/v1/completions", json={"model": MODEL_NAME, "prompt": "x", "max_tokens": 1})
    httpx.post(f"{server.url}/v1/completions", json={"model": MODEL_NAME, "prompt": "x", "max_tokens": -1})
    text = httpx.get(f"{server.url}/metrics").text
    assert re.search(r'sparsedial_requests_total\{endpoint="/v1/completions",finish_reason="(length|stop)",'
                     rf'model_name="{MODEL_NAME}"', text)
    assert (f'sparsedial_request_errors_total{{endpoint="/v1/completions",model_name="{MODEL_NAME}",status="400"}}'
            in text)


def test_each_app_has_its_own_registry(serve):
    a, b = serve(), serve()
    httpx.post(a.url + "/generate", json={"prompt": "x", "max_tokens": 1, "sparsity": "dense"})
    assert re.search(r'sparsedial_requests_total\{[^}]*tier="dense"\} 1.0', httpx.get(a.url + "/metrics").text)
    assert "sparsedial_requests_total{" not in httpx.get(b.url + "/metrics").text


def test_grafana_dashboard_queries_metrics_the_server_exports(server):
    """Every metric a panel of docker/grafana/sparsedial.json queries is one /metrics exports (with the
    model_name label the dashboard filters on), after a little traffic."""
    httpx.post(f"{server.url}/generate", json={"prompt": PROMPT, "max_tokens": 3, "sparsity": "50%"})
    httpx.post(f"{server.url}/generate", json={"prompt": PROMPT, "sparsity": "13:7"})
    exported = set(re.findall(r"^(sparsedial_\w+?)\{[^}]*model_name=", httpx.get(f"{server.url}/metrics").text,
                              re.MULTILINE))
    dash = json.loads((Path(__file__).resolve().parents[2] / "docker" / "grafana" / "sparsedial.json").read_text())
    queried = {m for p in dash["panels"] for t in p["targets"] for m in re.findall(r"sparsedial_\w+", t["expr"])}
    assert len(queried) >= 10 and queried <= exported, sorted(queried - exported)
