"""Every error the server promises, in OpenAI's error shape, via raw HTTP, our SDK and the openai package."""

from __future__ import annotations

import asyncio
import threading

import httpx
import openai
import pytest
from fake_engine import FakeEngine
from sparsedial.clients import (
    BadRequestError,
    InternalServerError,
    NotFoundError,
    RateLimitError,
    SparseDial,
)


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_unknown_tier_is_400_listing_tiers(server):
    for url, body in [("/generate", {"prompt": "x", "sparsity": "45%"}),
                      ("/v1/completions", {"model": "fake-model", "prompt": "x", "sparsity": "45%"})]:
        err = _error(httpx.post(server.url + url, json=body), 400)
        assert err["param"] == "sparsity" and err["code"] == "unknown_tier"
        assert "dense, 30%, 50%, 2:4" in err["message"]
    err = _error(httpx.post(server.url + "/v1/completions", json={"model": "fake-model@45%", "prompt": "x"}), 400)
    assert err["param"] == "model" and "2:4" in err["message"]


def test_unknown_model_is_404(server):
    with SparseDial(server.url, max_retries=0) as c, pytest.raises(NotFoundError, match="fake-model@2:4"):
        c.completions.create(model="gpt-4", prompt="x")


def test_prompt_longer_than_context_is_400(server, engine):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as oai:
        with pytest.raises(openai.BadRequestError) as e:
            oai.completions.create(model="fake-model", prompt="x" * 300, max_tokens=4)
    assert e.value.code == "context_length_exceeded" and "context of 256 tokens" in e.value.message


def test_schema_error_is_400_via_sdk(server):
    """OpenAI and vLLM answer schema errors with 400, so openai.BadRequestError handlers catch them."""
    with SparseDial(server.url, max_retries=0) as c, pytest.raises(BadRequestError) as e:
        c.completions.create(model="fake-model", prompt="x", n=0)
    assert e.value.param == "n" and e.value.status_code == 400


def test_invalid_json_is_400_without_a_param(server):
    r = httpx.post(server.url + "/generate", content=b"{not json", headers={"content-type": "application/json"})
    err = _error(r, 400)
    assert "invalid JSON" in err["message"] and err["param"] is None


def test_unknown_route_uses_error_shape(server):
    _error(httpx.get(server.url + "/v2/nothing"), 404)


async def _hold_streams(url: str, n: int, engine: FakeEngine, want_waiting: int):
    client = httpx.AsyncClient(base_url=url, timeout=30)
    body = {"prompt": "x", "max_tokens": 250, "stream": True}
    tasks = []
    for k in range(n):  # one at a time: the first must be running before the next one queues
        tasks.append(asyncio.create_task(client.post("/generate", json=body)))
        for _ in range(1000):
            if engine.running == 1 and engine.waiting == k:
                break
            await asyncio.sleep(0.01)
    assert engine.running == 1 and engine.waiting == want_waiting
    return client, tasks


def test_queue_full_is_429_with_retry_after_and_disconnect_frees_slots(serve):
    engine = FakeEngine(max_running=1, max_waiting=1, token_delay=0.01, retry_after=2.5)
    srv = serve(engine)

    async def scenario():
        client, tasks = await _hold_streams(srv.url, 2, engine, want_waiting=1)
        r = await client.post("/generate", json={"prompt": "x"})
        for t in tasks:  # the clients go away: both requests must be cancelled and their slots freed
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.aclose()
        for _ in range(300):
            if engine.running == engine.waiting == 0:
                break
            await asyncio.sleep(0.01)
        return r

    r = asyncio.run(scenario())
    err = _error(r, 429)
    assert r.headers["retry-after"] == "3" and err["code"] == "queue_full"
    assert engine.running == 0 and engine.waiting == 0 and len(engine.cancelled) == 2


def test_sdk_retries_429_then_raises_rate_limit(serve):
    engine = FakeEngine(max_waiting=0, retry_after=0.01)  # every request is refused
    srv = serve(engine)
    with SparseDial(srv.url, max_retries=2) as c, pytest.raises(RateLimitError):
        c.generate("x")
    assert engine.submitted == []


def test_non_streaming_disconnect_cancels(serve):
    engine = FakeEngine(token_delay=0.01)
    srv = serve(engine, disconnect_poll_s=0.02)

    async def scenario():
        async with httpx.AsyncClient(base_url=srv.url) as client:
            task = asyncio.create_task(client.post("/generate", json={"prompt": "x", "max_tokens": 250}))
            while engine.running == 0:
                await asyncio.sleep(0.01)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for _ in range(300):
            if engine.cancelled:
                break
            await asyncio.sleep(0.01)

    asyncio.run(scenario())
    assert len(engine.cancelled) == 1 and engine.running == 0


def test_not_ready_is_503_until_loaded(serve):
    release = threading.Event()
    engine = FakeEngine()

    def factory(settings):
        release.wait(10)
        return engine

    from conftest import LiveServer
    from sparsedial.server import ServerSettings, create_app

    srv = LiveServer(create_app(ServerSettings(), engine_factory=factory)).start()
    try:
        h = httpx.get(srv.url + "/health")
        assert h.status_code == 503 and h.json()["status"] == "loading"
        err = _error(httpx.post(srv.url + "/generate", json={"prompt": "x"}), 503)
        assert err["code"] == "not_ready"
        with SparseDial(srv.url, max_retries=0) as c, pytest.raises(InternalServerError):
            c.models.list()
        release.set()
        for _ in range(200):
            if httpx.get(srv.url + "/health").status_code == 200:
                break
            threading.Event().wait(0.02)
        assert httpx.get(srv.url + "/health").json() == {"status": "ok", "model": "fake-model",
                                                         "tiers": engine.tiers, "detail": None}
    finally:
        release.set()
        srv.stop()


def test_failed_load_reports_reason(serve, tmp_path):
    srv = serve(None, model=tmp_path / "missing")
    for _ in range(200):
        h = httpx.get(srv.url + "/health")
        if h.json()["status"] == "failed":
            break
        threading.Event().wait(0.02)
    assert h.status_code == 503 and "missing" in h.json()["detail"]
    with SparseDial(srv.url, max_retries=0) as c, pytest.raises(InternalServerError, match="failed to load"):
        c.generate("x")


def test_bad_request_class_for_sampling_values(server):
    with SparseDial(server.url, max_retries=0) as c, pytest.raises(BadRequestError, match="top_logprobs"):
        c.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "x"}], top_logprobs=2)


def test_docs_page_works_offline(server):
    """/docs lists the routes from the OpenAPI schema with no script or stylesheet from elsewhere."""
    page = httpx.get(server.url + "/docs")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "<code>/generate</code>" in page.text and "<code>/v1/chat/completions</code>" in page.text
    assert "<script" not in page.text and "://" not in page.text  # nothing to fetch from a CDN
    assert httpx.get(server.url + "/redoc").status_code == 404
    assert "/generate" in httpx.get(server.url + "/openapi.json").json()["paths"]
