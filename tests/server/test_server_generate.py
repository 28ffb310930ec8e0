"""POST /generate over a live server: JSON and SSE, tier selection, sampling fields, SDK round trips."""

from __future__ import annotations

import json

import httpx
import pytest
from sparsedial.clients import SparseDial
from sparsedial.clients.types import GenerateResponse, GenerateToken


def test_generate_json_reports_tier_usage_and_timings(server, engine):
    r = httpx.post(f"{server.url}/generate", json={"prompt": "hello", "max_tokens": 5, "sparsity": "50%"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["text"] == "abcde"
    assert body["tier"] == "50%" and body["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}
    assert set(body["timings"]) == {"queue_s", "ttft_s", "e2e_s", "mean_itl_s"}
    assert engine.submitted[-1].tier == "50%"


def test_generate_passes_sampling_fields_to_engine(server, engine):
    r = httpx.post(f"{server.url}/generate", json={
        "prompt": [104, 105], "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 3, "seed": 11,
        "stop": "e", "logprobs": 1, "sparsity": 0.3})
    assert r.status_code == 200, r.text
    p = engine.submitted[-1].params
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.stop, p.logprobs) == \
        (7, 0.5, 0.9, 3, 11, ("e",), 1)
    body = r.json()
    assert body["text"] == "abcd" and body["finish_reason"] == "stop" and body["tier"] == "30%"
    assert [lp["text"] for lp in body["logprobs"]] == list("abcd")


def test_generate_auto_uses_default_tier(server, engine):
    engine.policy = engine.policy.__class__(default_tier="2:4")
    for sparsity in (None, "auto"):
        payload = {"prompt": "x", "max_tokens": 1} | ({"sparsity": sparsity} if sparsity else {})
        assert httpx.post(f"{server.url}/generate", json=payload).json()["tier"] == "2:4"


def test_generate_stream_sse_framing(server):
    with httpx.stream("POST", f"{server.url}/generate", json={"prompt": "p", "max_tokens": 3, "stream": True,
                                                                "sparsity": "dense"}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert [p["type"] for p in payloads] == ["token"] * 3 + ["finish"]
    assert "".join(p["text"] for p in payloads[:3]) == "abc"
    assert payloads[-1]["tier"] == "dense" and payloads[-1]["text"] == "abc"


def test_sdk_generate_and_stream(server):
    with SparseDial(server.url, max_retries=0) as client:
        r = client.generate("hi", max_tokens=4, sparsity="2:4")
        assert isinstance(r, GenerateResponse) and r.text == "abcd" and r.tier == "2:4"
        chunks = list(client.generate("hi", max_tokens=2, stream=True))
    assert [type(c) for c in chunks] == [GenerateToken, GenerateToken, GenerateResponse]
    assert chunks[-1].type == "finish" and chunks[-1].usage.completion_tokens == 2


@pytest.mark.parametrize("payload, field", [
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": "x", "sparsty": "50%"}, "sparsty"),
])
def test_generate_schema_errors_are_400_naming_the_field(server, payload, field):
    r = httpx.post(f"{server.url}/generate", json=payload)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == field and field in err["message"]
    assert err["type"] == "invalid_request_error"
