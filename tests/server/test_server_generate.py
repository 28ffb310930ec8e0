"""POST /generate over a live server on the real engine: JSON and SSE, tier selection (a "45%" in-between tier
included), sampling fields, SDK round trips. Dense answers are checked against transformers, sparse and
sampled ones against the engine's own submit (no HTTP) for the same request."""

from __future__ import annotations

import httpx
import pytest
from reference import decode, direct, encode, hf_greedy, hf_logprobs, sse_payloads
from sparsedial.clients import SparseDial
from sparsedial.clients.types import GenerateResponse, GenerateToken

PROMPT = "def fibonacci(n):"


def post(server, **body) -> dict:
    r = httpx.post(f"{server.url}/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_dense_greedy_matches_transformers(server):
    want = hf_greedy(PROMPT, 16)
    body = post(server, prompt=PROMPT, max_tokens=16, temperature=0, sparsity="dense", logprobs=2)
    assert body["tier"] == "dense" and body["text"] == decode(want)
    assert [lp["token_id"] for lp in body["logprobs"]] == want
    ref = hf_logprobs(encode(PROMPT) + want)[len(encode(PROMPT)) - 1:]  # row k: the distribution of token k
    for k, lp in enumerate(body["logprobs"]):
        assert lp["logprob"] == pytest.approx(ref[k, want[k]].item(), abs=1e-3)
        top_ids = [t[0] for t in lp["top"]]
        assert top_ids == ref[k].topk(2).indices.tolist() and top_ids[0] == want[k]  # greedy: the best one
        assert [t[2] for t in lp["top"]] == pytest.approx(ref[k].topk(2).values.tolist(), abs=1e-3)
        assert lp["text"] == decode([want[k]])


def test_generate_json_reports_tier_usage_and_timings(server, engine):
    ref = direct(engine, PROMPT, "50%", max_tokens=5, temperature=0)
    body = post(server, prompt=PROMPT, max_tokens=5, temperature=0, sparsity="50%")
    assert body["text"] == ref.text and ref.text
    assert body["tier"] == "50%" and body["finish_reason"] == "length"
    n = len(encode(PROMPT))
    assert body["usage"] == {"prompt_tokens": n, "completion_tokens": 5, "total_tokens": n + 5}
    assert set(body["timings"]) == {"queue_s", "ttft_s", "e2e_s", "mean_itl_s"}
    t = body["timings"]
    assert 0 <= t["queue_s"] <= t["ttft_s"] <= t["e2e_s"] and t["mean_itl_s"] > 0


@pytest.mark.parametrize("sparsity", ["45%", 0.45, "45.4%"])
def test_in_between_tier_45_is_served(server, engine, sparsity):
    """45% is not one of the checkpoint's listed tiers (40%, 50%); the model serves every whole percent."""
    assert "45%" not in engine.tiers
    ref = direct(engine, PROMPT, "45%", max_tokens=8, temperature=0)
    body = post(server, prompt=PROMPT, max_tokens=8, temperature=0, sparsity=sparsity)
    assert body["tier"] == "45%" and body["text"] == ref.text
    for tier in ("40%", "50%"):  # really another tier, not a neighbour's weights
        assert post(server, prompt=PROMPT, max_tokens=8, temperature=0, sparsity=tier)["text"] != ref.text


def test_generate_passes_sampling_fields_to_engine(server, engine):
    ids = encode("class Stack:")
    fields = {"max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 3, "seed": 11, "logprobs": 1}
    ref = direct(engine, ids, "30%", **fields)
    body = post(server, prompt=ids, sparsity=0.3, **fields)
    assert body["tier"] == "30%" and body["text"] == ref.text and body["finish_reason"] == ref.finish_reason
    assert [lp["token_id"] for lp in body["logprobs"]] == ref.token_ids
    assert [lp["logprob"] for lp in body["logprobs"]] == pytest.approx([lp.logprob for lp in ref.logprobs])
    assert all(len(lp["top"]) == 1 for lp in body["logprobs"])
    assert body["usage"]["prompt_tokens"] == len(ids)
    # the same request with a stop string found in that text: cut before its first occurrence
    mid = len(ref.text) // 2
    stop = ref.text[mid:mid + 2]
    assert stop.strip(), ref.text
    body = post(server, prompt=ids, sparsity=0.3, stop=stop, **fields)
    assert body["finish_reason"] == "stop" and body["text"] == ref.text[:ref.text.find(stop)]


def test_generate_auto_uses_default_tier(server, engine):
    from sparsedial.engine.api import PolicySpec

    engine.set_policy(PolicySpec(default_tier="2:4"))  # the fixture puts the engine's policy back
    ref = direct(engine, PROMPT, "2:4", max_tokens=3, temperature=0)
    for sparsity in (None, "auto"):
        payload = {"prompt": PROMPT, "max_tokens": 3, "temperature": 0} | ({"sparsity": sparsity} if sparsity else {})
        body = post(server, **payload)
        assert body["tier"] == "2:4" and body["text"] == ref.text


def test_generate_stream_sse_framing(server):
    want = hf_greedy(PROMPT, 3)
    with httpx.stream("POST", f"{server.url}/generate", json={"prompt": PROMPT, "max_tokens": 3, "stream": True,
                                                                "temperature": 0, "sparsity": "dense"}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = sse_payloads(raw)[:-1]
    assert [p["type"] for p in payloads] == ["token"] * 3 + ["finish"]
    assert [p["token_id"] for p in payloads[:3]] == want and [p["index"] for p in payloads[:3]] == [0, 1, 2]
    assert "".join(p["text"] for p in payloads[:3]) == decode(want)
    assert payloads[-1]["tier"] == "dense" and payloads[-1]["text"] == decode(want)
    assert payloads[-1]["usage"]["completion_tokens"] == 3


def test_sdk_generate_and_stream(server, engine):
    ref = direct(engine, PROMPT, "2:4", max_tokens=4, temperature=0)
    with SparseDial(server.url, max_retries=0) as client:
        r = client.generate(PROMPT, max_tokens=4, sparsity="2:4", temperature=0)
        assert isinstance(r, GenerateResponse) and r.text == ref.text and r.tier == "2:4"
        chunks = list(client.generate(PROMPT, max_tokens=2, stream=True, temperature=0, sparsity="2:4"))
    assert [type(c) for c in chunks] == [GenerateToken, GenerateToken, GenerateResponse]
    assert [c.token_id for c in chunks[:2]] == ref.token_ids[:2]
    assert chunks[-1].type == "finish" and chunks[-1].usage.completion_tokens == 2 and chunks[-1].tier == "2:4"


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
