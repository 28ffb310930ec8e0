"""The SDK without a server: import weight, env settings, retries/backoff, errors by status, SSE parsing."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import httpx
import pytest
from sparsedial.clients import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    AsyncSparseDial,
    AuthenticationError,
    BadRequestError,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    SparseDial,
    UnprocessableEntityError,
)
from sparsedial.clients._base import ClientOptions, iter_sse

OK_MODELS = {"object": "list", "data": [{"id": "m", "root": "m"}, {"id": "m@50%", "root": "m", "parent": "m"}]}


def test_importable_with_only_httpx_and_pydantic():
    code = ("import sys\n"
            "for m in ('torch', 'transformers', 'fastapi', 'uvicorn', 'starlette', 'numpy', 'prometheus_client'):\n"
            "    sys.modules[m] = None\n"
            "import sparsedial.clients as c\n"
            "assert c.SparseDial and c.AsyncSparseDial\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def _client(handler, **kw) -> SparseDial:
    kw.setdefault("backoff_base_s", 0.001)
    return SparseDial("http://sd.test", http_client=httpx.Client(base_url="http://sd.test",
                                                                 transport=httpx.MockTransport(handler)), **kw)


def test_env_settings_and_headers(monkeypatch):
    monkeypatch.setenv("SPARSEDIAL_BASE_URL", "http://10.0.0.1:9000/")
    monkeypatch.setenv("SPARSEDIAL_API_KEY", "key")
    monkeypatch.setenv("SPARSEDIAL_ADMIN_TOKEN", "adm")
    c = SparseDial()
    assert c.base_url == "http://10.0.0.1:9000"
    assert c._opts.headers() == {"Authorization": "Bearer key"}
    assert c._opts.headers(admin=True) == {"Authorization": "Bearer adm"}
    assert SparseDial(base_url="http://x", admin_token="a2").base_url == "http://x"
    c.close()


def test_retries_503_then_succeeds_honouring_retry_after():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) < 3:
            return httpx.Response(503, headers={"Retry-After": "0.01"}, json={"error": {"message": "loading"}})
        return httpx.Response(200, json=OK_MODELS)

    with _client(handler, max_retries=2) as c:
        assert [m.id for m in c.models.list().data] == ["m", "m@50%"]
    assert len(calls) == 3


def test_retry_delay_backoff_and_retry_after():
    opts = ClientOptions.resolve("http://x", None, None, 1.0, 3, 0.5, 4.0)
    assert opts.retry_delay(0, httpx.Response(429, headers={"Retry-After": "7"})) == 7.0
    assert opts.retry_delay(0, httpx.Response(429, headers={"Retry-After": "9999"})) == 60.0
    for attempt, cap in [(0, 0.5), (1, 1.0), (2, 2.0), (5, 4.0)]:
        d = opts.retry_delay(attempt, None)
        assert cap / 2 <= d <= cap  # jittered within [cap/2, cap]


@pytest.mark.parametrize("status, cls", [(400, BadRequestError), (401, AuthenticationError),
                                         (403, PermissionDeniedError), (404, NotFoundError),
                                         (422, UnprocessableEntityError), (429, RateLimitError),
                                         (500, InternalServerError), (503, InternalServerError),
                                         (418, APIStatusError)])
def test_errors_by_status(status, cls):
    calls = []

    def handler(request):
        calls.append(1)
        return httpx.Response(status, json={"error": {"message": "nope", "type": "t", "param": "p", "code": "c"}})

    with _client(handler, max_retries=1) as c, pytest.raises(cls) as e:
        c.models.list()
    assert e.value.status_code == status and e.value.param == "p" and e.value.code == "c"
    assert "nope" in str(e.value)
    assert len(calls) == (2 if status in (429, 503) else 1)  # only 429/503 are retried


def test_timeout_and_connection_errors_are_retried_then_raised():
    calls = []

    def timeout(request):
        calls.append(1)
        raise httpx.ReadTimeout("slow", request=request)

    with _client(timeout, max_retries=1) as c, pytest.raises(APITimeoutError):
        c.generate("x")
    assert len(calls) == 2
    with SparseDial("http://127.0.0.1:9", max_retries=0, timeout=2) as c, pytest.raises(APIConnectionError):
        c.models.list()


def test_sse_parsing_multiline_comments_and_done():
    lines = [": keep-alive", "", 'data: {"a":', "data: 1}", "", "event: x", 'data: {"b": 2}', "",
             "data: [DONE]", "", 'data: {"never": 1}', ""]
    assert list(iter_sse(iter(lines))) == [{"a": 1}, {"b": 2}]
    with pytest.raises(APIError, match="boom") as e:
        list(iter_sse(iter(['data: {"error": {"message": "boom", "code": "engine_error"}}', ""])))
    assert e.value.code == "engine_error"


def test_stream_yields_typed_chunks():
    sse = (b'data: {"type":"token","id":"g","index":0,"token_id":97,"text":"a"}\n\n'
           b'data: {"type":"finish","id":"g","model":"m","text":"a","tier":"2:4","finish_reason":"length",'
           b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2},"timings":{"e2e_s":0.1}}\n\n'
           b"data: [DONE]\n\n")
    seen = []

    def handler(request):
        seen.append(request)
        return httpx.Response(200, content=sse, headers={"content-type": "text/event-stream"})

    with _client(handler) as c:
        chunks = list(c.generate("x", stream=True, sparsity="2:4"))
    assert [type(ch).__name__ for ch in chunks] == ["GenerateToken", "GenerateResponse"]
    assert chunks[1].tier == "2:4"
    import json
    assert json.loads(seen[0].content) == {"prompt": "x", "sparsity": "2:4", "stream": True}


def test_async_client_retries_and_models():
    calls = []

    def handler(request):
        calls.append(1)
        return httpx.Response(429 if len(calls) == 1 else 200, json=OK_MODELS if len(calls) > 1 else {})

    async def run():
        http = httpx.AsyncClient(base_url="http://sd.test", transport=httpx.MockTransport(handler))
        async with AsyncSparseDial("http://sd.test", http_client=http, backoff_base_s=0.001) as c:
            return await c.models.list()

    assert asyncio.run(run()).data[1].parent == "m" and len(calls) == 2


def test_async_create_rejects_unknown_argument():
    async def run():
        async with AsyncSparseDial("http://sd.test") as c:
            await c.completions.create(model="m", prompt="x", bogus=1)

    with pytest.raises(TypeError):
        asyncio.run(run())
