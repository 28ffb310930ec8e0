"""Every error the server promises, in OpenAI's error shape, via raw HTTP, our SDK and the openai package, on
the real engine: bad input, unknown tiers, a full queue, disconnects, loading / failed engines and a failed
model forward (injected into the real engine's model runner: reference.poisoned)."""

from __future__ import annotations

import asyncio
import threading

import httpx
import openai
import pytest
from conftest import CONTEXT, MODEL_NAME, REAL_MODEL, TIERS, idle, make_engine, wait_until
from reference import INJECTED, decode, encode, hf_greedy, poisoned, slowed, sse_payloads
from sparsedial.clients import (
    BadRequestError,
    InternalServerError,
    NotFoundError,
    RateLimitError,
    SparseDial,
)
from sparsedial.server import ServerSettings, create_app
from sparsedial.server.live import LiveServer

PROMPT = "def fibonacci(n):"
CHAT = [{"role": "user", "content": "write a sort"}]
CHAT_PROMPT = "user: write a sort\n\nassistant:"  # server/chat.py's fallback template (the model has none)


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


# ------------------------------------------------------------------------------------ bad requests
def test_unknown_tier_is_400_listing_tiers(server):
    listed = ", ".join(TIERS)
    for url, body in [("/generate", {"prompt": "x", "sparsity": "13:7"}),
                      ("/generate", {"prompt": "x", "sparsity": "95%"}),
                      ("/v1/completions", {"model": MODEL_NAME, "prompt": "x", "sparsity": "95%"})]:
        err = _error(httpx.post(server.url + url, json=body), 400)
        assert err["param"] == "sparsity" and err["code"] == "unknown_tier" and err["type"] == "invalid_request_error"
        assert f"available: {listed}, auto, or any whole percent from 1% to 90%" in err["message"]
    err = _error(httpx.post(server.url + "/v1/completions", json={"model": f"{MODEL_NAME}@95%", "prompt": "x"}), 400)
    assert err["param"] == "model" and "2:4" in err["message"]


def test_unknown_model_is_404(server):
    with SparseDial(server.url, max_retries=0) as c, pytest.raises(NotFoundError, match=f"{MODEL_NAME}@2:4"):
        c.completions.create(model="gpt-4", prompt="x")


def test_prompt_longer_than_context_is_400(server):
    prompt = "x = 1\n" * 300
    assert len(encode(prompt)) + 4 > CONTEXT
    with (openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as oai,
          pytest.raises(openai.BadRequestError) as e):
        oai.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=4)
    assert e.value.code == "context_length_exceeded" and f"context of {CONTEXT} tokens" in e.value.message


def test_schema_error_is_400_via_sdk(server):
    """OpenAI and vLLM answer schema errors with 400, so openai.BadRequestError handlers catch them."""
    with SparseDial(server.url, max_retries=0) as c, pytest.raises(BadRequestError) as e:
        c.completions.create(model=MODEL_NAME, prompt="x", n=0)
    assert e.value.param == "n" and e.value.status_code == 400


def test_invalid_json_is_400_without_a_param(server):
    r = httpx.post(server.url + "/generate", content=b"{not json", headers={"content-type": "application/json"})
    err = _error(r, 400)
    assert "invalid JSON" in err["message"] and err["param"] is None


def test_unknown_route_uses_error_shape(server):
    _error(httpx.get(server.url + "/v2/nothing"), 404)


def test_bad_request_class_for_sampling_values(server):
    with SparseDial(server.url, max_retries=0) as c, pytest.raises(BadRequestError, match="top_logprobs"):
        c.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "x"}], top_logprobs=2)


# ------------------------------------------------------------------------------------ a failed forward
def _is_engine_error(err: dict) -> None:
    assert err["type"] == "server_error" and err["code"] == "engine_error" and err["param"] is None
    assert "generation failed" in err["message"] and INJECTED in err["message"]


def test_failed_forward_is_500_in_openai_shape(server, engine):
    """The model runner raises for every forward of two prompts: those requests fail with a 500 each; the engine
    stays healthy and the next request gets its correct tokens."""
    bad = encode("def broken():")
    want = decode(hf_greedy(PROMPT, 4))
    with poisoned(engine, bad, encode(CHAT_PROMPT)) as failed:
        _is_engine_error(_error(httpx.post(f"{server.url}/v1/completions", json={
            "model": MODEL_NAME, "prompt": bad, "max_tokens": 4}), 500))
        _is_engine_error(_error(httpx.post(f"{server.url}/v1/chat/completions", json={
            "model": MODEL_NAME, "messages": CHAT, "max_tokens": 4}), 500))
        _is_engine_error(_error(httpx.post(f"{server.url}/generate", json={"prompt": bad, "max_tokens": 4}), 500))
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as oai:
            with pytest.raises(openai.InternalServerError) as e:
                oai.completions.create(model=MODEL_NAME, prompt=[bad], max_tokens=4)
            assert e.value.status_code == 500 and e.value.code == "engine_error"
            with pytest.raises(openai.InternalServerError) as e:
                oai.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=4)
            assert e.value.body["type"] == "server_error" and INJECTED in e.value.message
            ok = oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0)
        assert ok.choices[0].text == want
        assert len(failed) == 5  # one failed prefill per failed request
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    metrics = httpx.get(f"{server.url}/metrics").text
    for endpoint, n in (("/v1/completions", 2), ("/v1/chat/completions", 2), ("/generate", 1)):
        assert (f'sparsedial_request_errors_total{{endpoint="{endpoint}",model_name="{MODEL_NAME}",status="500"}} '
                f'{n}.0') in metrics


def test_failed_forward_in_a_batch_fails_only_its_request(server, engine):
    """A request poisoned after 2 tokens while another decodes beside it: the batched forward raises, the engine
    reruns the rows alone, and the other request finishes with the transformers tokens."""
    bad = encode("def broken():")
    want = hf_greedy(PROMPT, 40)

    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            good = asyncio.create_task(client.post("/generate", json={
                "prompt": PROMPT, "max_tokens": 40, "temperature": 0, "sparsity": "dense"}))
            while engine.stats().running == 0:
                await asyncio.sleep(0.005)
            failing = await client.post("/generate", json={"prompt": bad, "max_tokens": 24, "ignore_eos": True})
            return await good, failing

    with slowed(engine, 0.02), poisoned(engine, bad, after_tokens=2) as failed:  # the good one: >= 0.8 s
        good, failing = asyncio.run(scenario())
    _is_engine_error(_error(failing, 500))
    assert good.status_code == 200 and good.json()["text"] == decode(want)
    assert failed


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions", "/generate"])
def test_failed_forward_mid_stream_sends_an_error_event(server, engine, endpoint):
    """Tokens streamed before the failure arrive; then one `data: {"error": {...}}` event, then [DONE]."""
    chat = endpoint == "/v1/chat/completions"
    prompt = CHAT_PROMPT if chat else PROMPT
    body = {"messages": CHAT} if chat else {"prompt": prompt}
    body |= {"model": MODEL_NAME, "max_tokens": 10, "stream": True, "temperature": 0, "ignore_eos": True}
    if endpoint == "/generate":
        del body["model"]
    want = decode(hf_greedy(prompt, 3))
    with (poisoned(engine, encode(prompt), after_tokens=3),
          httpx.stream("POST", server.url + endpoint, json=body, timeout=60) as r):
        assert r.status_code == 200  # the stream had started
        events = sse_payloads(r.iter_lines())
    assert events[-1] == "DONE" and set(events[-2]) == {"error"}
    err = events[-2]["error"]
    assert set(err) == {"message", "type", "param", "code"}
    _is_engine_error(err)
    chunks = events[:-2]
    if endpoint == "/generate":
        text = "".join(c["text"] for c in chunks)
        assert [c["type"] for c in chunks] == ["token"] * 3
    elif chat:
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks)
    else:
        text = "".join(c["choices"][0]["text"] for c in chunks)
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks)
    assert text == want


def test_failed_forward_before_the_first_token_of_a_stream_is_500(server, engine):
    """The first event is taken before the response starts: a failed prefill is a plain 500, not a stream."""
    with poisoned(engine, encode(PROMPT), encode(CHAT_PROMPT)):
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as oai:
            with pytest.raises(openai.InternalServerError) as e:
                oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, stream=True)
            assert e.value.code == "engine_error"
            with pytest.raises(openai.InternalServerError) as e:
                oai.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=4, stream=True)
            assert e.value.code == "engine_error"
        with httpx.stream("POST", f"{server.url}/generate", json={"prompt": PROMPT, "stream": True}) as r:
            r.read()
        _is_engine_error(_error(r, 500))


def test_openai_client_raises_on_the_error_event(server, engine):
    got = []
    with (poisoned(engine, encode(PROMPT), after_tokens=2),
          openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as oai,
          pytest.raises(openai.APIError, match=INJECTED) as e):
        for chunk in oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=10, stream=True,
                                            temperature=0, extra_body={"ignore_eos": True}):
            got.append(chunk.choices[0].text)
    assert e.value.body["code"] == "engine_error" and "".join(got) == decode(hf_greedy(PROMPT, 2))


# ------------------------------------------------------------------------------------ load, disconnects
@pytest.fixture(scope="module")
def one_slot():
    """A second real engine: one KV slot, one waiting place."""
    engine = make_engine(max_batch=1, max_waiting=1, resident_tiers=("dense",))
    yield engine
    engine.shutdown()


async def _hold_streams(url: str, n: int, engine):
    client = httpx.AsyncClient(base_url=url, timeout=30)
    body = {"prompt": PROMPT, "max_tokens": 900, "stream": True, "ignore_eos": True}
    tasks = []
    for k in range(n):  # one at a time: the first must be running before the next one queues
        tasks.append(asyncio.create_task(client.post("/generate", json=body)))
        for _ in range(2000):
            s = engine.stats()
            if s.running == 1 and s.waiting == k:
                break
            await asyncio.sleep(0.005)
    s = engine.stats()
    assert s.running == 1 and s.waiting == n - 1
    return client, tasks


def test_queue_full_is_429_with_retry_after_and_disconnect_frees_slots(serve, one_slot):
    srv = serve(one_slot)
    aborted: list[str] = []
    real_abort = one_slot.abort

    def abort(request_id):  # record the aborts, then do them
        aborted.append(request_id)
        return real_abort(request_id)

    async def scenario():
        client, tasks = await _hold_streams(srv.url, 2, one_slot)
        r = await client.post("/generate", json={"prompt": "x"})
        # the SDK retries after Retry-After (1 s), twice, then gives up
        with SparseDial(srv.url, max_retries=2) as c, pytest.raises(RateLimitError):
            await asyncio.to_thread(c.generate, "x")
        for t in tasks:  # the clients go away: both requests must be cancelled and their slots freed
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.aclose()
        for _ in range(1000):
            if idle(one_slot):
                break
            await asyncio.sleep(0.01)
        return r

    one_slot.abort = abort
    try:
        with slowed(one_slot, 0.01):
            r = asyncio.run(scenario())
    finally:
        del one_slot.abort
    err = _error(r, 429)
    assert r.headers["retry-after"] == "1" and err["code"] == "queue_full" and err["type"] == "rate_limit_error"
    assert idle(one_slot) and len(aborted) == 2
    text = httpx.get(srv.url + "/metrics").text
    assert f'sparsedial_request_errors_total{{endpoint="/generate",model_name="{MODEL_NAME}",status="429"}} 4.0' in text


def test_non_streaming_disconnect_cancels(serve, engine):
    srv = serve(disconnect_poll_s=0.02)
    aborted: list[str] = []
    real_abort = engine.abort

    def abort(request_id):
        aborted.append(request_id)
        return real_abort(request_id)

    async def scenario():
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
            task = asyncio.create_task(client.post("/generate", json={"prompt": PROMPT, "max_tokens": 900,
                                                                       "ignore_eos": True}))
            while engine.stats().running == 0:
                await asyncio.sleep(0.005)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for _ in range(1000):
            if aborted and idle(engine):
                break
            await asyncio.sleep(0.01)

    engine.abort = abort
    try:
        with slowed(engine, 0.01):  # 900 steps: >= 9 s unless cancelled
            asyncio.run(scenario())
    finally:
        del engine.abort
    assert len(aborted) == 1 and idle(engine)


def test_stream_disconnect_frees_the_slot(server, engine):
    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            body = {"prompt": PROMPT, "max_tokens": 900, "stream": True, "ignore_eos": True}
            async with client.stream("POST", "/generate", json=body) as r:
                async for _ in r.aiter_lines():
                    break  # one event, then hang up
        for _ in range(1000):
            if idle(engine):
                return True
            await asyncio.sleep(0.01)
        return False

    with slowed(engine, 0.01):
        assert asyncio.run(scenario()), engine.stats()


# ------------------------------------------------------------------------------------ engine not there
def test_not_ready_is_503_until_loaded():
    """A real engine of its own (the app shuts it down), loaded once the test says go."""
    release = threading.Event()

    def factory(_settings):
        release.wait(30)
        return make_engine(max_batch=1, resident_tiers=("dense",))  # the other tiers build on first use

    srv = LiveServer(create_app(ServerSettings(model=REAL_MODEL), engine_factory=factory)).start()
    try:
        h = httpx.get(srv.url + "/health")
        assert h.status_code == 503 and h.json()["status"] == "loading"
        err = _error(httpx.post(srv.url + "/generate", json={"prompt": "x"}), 503)
        assert err["code"] == "not_ready"
        with SparseDial(srv.url, max_retries=0) as c, pytest.raises(InternalServerError):
            c.models.list()
        release.set()
        assert wait_until(lambda: httpx.get(srv.url + "/health").status_code == 200, timeout=60)
        assert httpx.get(srv.url + "/health").json() == {"status": "ok", "model": MODEL_NAME, "tiers": TIERS,
                                                         "detail": None}
        r = httpx.post(srv.url + "/generate", json={"prompt": PROMPT, "max_tokens": 3, "temperature": 0})
        assert r.json()["text"] == decode(hf_greedy(PROMPT, 3))
    finally:
        release.set()
        srv.stop()


def test_failed_load_reports_reason(serve, tmp_path):
    srv = serve(None, model=tmp_path / "missing")
    assert wait_until(lambda: httpx.get(srv.url + "/health").json()["status"] == "failed")
    h = httpx.get(srv.url + "/health")
    assert h.status_code == 503 and "missing" in h.json()["detail"]
    with SparseDial(srv.url, max_retries=0) as c, pytest.raises(InternalServerError, match="failed to load"):
        c.generate("x")


def test_docs_page_works_offline(server):
    """/docs lists the routes from the OpenAPI schema with no script or stylesheet from elsewhere."""
    page = httpx.get(server.url + "/docs")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "<code>/generate</code>" in page.text and "<code>/v1/chat/completions</code>" in page.text
    assert "<script" not in page.text and "://" not in page.text  # nothing to fetch from a CDN
    assert httpx.get(server.url + "/redoc").status_code == 404
    assert "/generate" in httpx.get(server.url + "/openapi.json").json()["paths"]
