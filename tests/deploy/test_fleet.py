"""The 2-replica Ray Serve fleet end to end: the official openai client, admin tier changes on every replica,
cancellation on client disconnect, the fleet `auto` policy under load, and a replica killed under load (its
in-flight requests get sparsedial's JSON error, the others are served)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = pytest.mark.slow  # starts a Ray cluster (~1 min): `make test-deploy`, not `make test`


def test_openai_client(clean):
    openai = pytest.importorskip("openai")
    c = openai.OpenAI(base_url=clean.url + "/v1", api_key="unused", max_retries=0)
    ids = [m.id for m in c.models.list().data]
    assert clean.model in ids and f"{clean.model}@50%" in ids
    r = c.completions.create(model=clean.model, prompt="def main():", max_tokens=6, temperature=0)
    assert r.choices[0].text and r.usage.completion_tokens == 6 and r.tier == "dense"
    r = c.completions.create(model=f"{clean.model}@70%", prompt="import os", max_tokens=4)
    assert r.tier == "70%"
    r = c.chat.completions.create(model=clean.model, messages=[{"role": "user", "content": "hello"}], max_tokens=5,
                                  extra_body={"sparsity": "2:4"})
    assert r.choices[0].message.content is not None and r.tier == "2:4"
    chunks = list(c.chat.completions.create(model=f"{clean.model}@40%", messages=[{"role": "user", "content": "x"}],
                                            max_tokens=8, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].tier == "40%"
    assert len(chunks) >= 8  # one delta per token (plus the role / finish chunks)
    text = "".join(ch.choices[0].text for ch in c.completions.create(
        model=clean.model, prompt="class A:", max_tokens=6, stream=True, extra_body={"sparsity": "30%"}))
    assert text
    # /generate streams too, with the tier in its finish event
    with clean.http.stream("POST", "/generate", json={"prompt": "x = ", "max_tokens": 5, "stream": True,
                                                       "sparsity": "60%"}) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert events[-1]["type"] == "finish" and events[-1]["tier"] == "60%"
    assert clean.http.get("/health").json()["status"] == "ok"


def test_admin_tier_change_reaches_every_replica(clean):
    r = clean.http.put("/admin/tier", json={"mode": "fixed", "default_tier": "40%"}, headers=clean.auth)
    assert r.status_code == 200, r.text
    assert r.headers["x-sparsedial-replicas-applied"] == "2/2"
    version = int(r.headers["x-sparsedial-policy-version"])
    view = clean.view()
    assert [(x["policy_version"] >= version, x["auto_tier"]) for x in view["replica_reports"]] == [(True, "40%")] * 2
    for _ in range(4):  # whichever replica answers GET /admin/tier, it is the fleet's policy
        state = clean.http.get("/admin/tier", headers=clean.auth).json()
        assert state["policy"]["mode"] == "fixed" and state["current_auto_tier"] == "40%"
    with ThreadPoolExecutor(8) as pool:
        tiers = list(pool.map(lambda _: clean.http.post("/generate", json={"prompt": "def f():", "max_tokens": 24})
                              .json()["tier"], range(12)))
    assert set(tiers) == {"40%"}
    # both replicas served at 40% (each replica's series carry its `replica` label in the fleet's /metrics)
    time.sleep(1.5)  # replicas send their metrics text every second
    served = {line.split('replica="')[1].split('"')[0] for line in clean.http.get("/metrics").text.splitlines()
              if line.startswith("sparsedial_requests_total{") and 'tier="40%"' in line}
    assert len(served) == 2, served
    r = clean.http.put("/admin/tier", json={"default_tier": "no-such-tier"}, headers=clean.auth)
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_tier"
    assert clean.http.put("/admin/tier", json={"default_tier": "dense"}).status_code == 401


def test_client_disconnect_cancels_the_request(clean):
    body = {"prompt": "def f():", "max_tokens": 900, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=clean.url, timeout=30) as h, h.stream("POST", "/generate", json=body) as s:
        lines = s.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(x.startswith("data: ") for x in got)
        clean.wait(lambda v: sum(x["running"] + x["waiting"] for x in v["replica_reports"]) == 1, 5,
                   "the request running on a replica")
    t0 = time.monotonic()
    clean.idle(10)  # 900 tokens take far longer than this: the engine cancelled the request
    assert time.monotonic() - t0 < 10


def _generate(url: str, max_tokens: int, results: list, tag: object = None) -> None:
    t0 = time.monotonic()
    try:
        r = httpx.post(url + "/generate", json={"prompt": "def main():", "max_tokens": max_tokens,
                                                "ignore_eos": True}, timeout=120)
        results.append((tag, t0, time.monotonic(), r.status_code, r.json() if r.status_code == 200 else r.text))
    except httpx.HTTPError as exc:
        results.append((tag, t0, time.monotonic(), None, f"{type(exc).__name__}: {exc}"))


def test_auto_moves_sparser_under_load_and_back(clean):
    assert clean.http.get("/admin/tier", headers=clean.auth).json()["current_auto_tier"] == "dense"
    results: list = []
    threads = [threading.Thread(target=_generate, args=(clean.url, 160, results)) for _ in range(14)]
    for t in threads:
        t.start()
    seen = set()
    while any(t.is_alive() for t in threads):
        seen.add(clean.http.get("/admin/tier", headers=clean.auth).json()["current_auto_tier"])
        time.sleep(0.1)
    for t in threads:
        t.join()
    assert all(r[3] == 200 for r in results), results
    served = {r[4]["tier"] for r in results}
    assert "70%" in seen and served & {"50%", "70%"}, (seen, served)  # 14 requests > 10: the top step
    clean.wait(lambda v: v["tier"] == "dense" and all(x["auto_tier"] == "dense" for x in v["replica_reports"]),
               10, "the fleet back at dense on every replica")  # load 0 < 6 - 2
    r = clean.http.post("/generate", json={"prompt": "x", "max_tokens": 2}).json()
    assert r["tier"] == "dense"


LONG_KINDS = ("generate", "generate-sse", "completions", "completions-sse", "chat", "chat-sse")
LONG_TOKENS = 320  # ~4 s here with 3 requests a replica: all of them are still running at the kill


def _long_request(url: str, model: str, kind: str, out: list) -> None:
    """One long request of `kind` (route, streamed or not); out gets a dict of what came back."""
    stream = kind.endswith("-sse")
    route = kind.removesuffix("-sse")
    body: dict = {"max_tokens": LONG_TOKENS, "ignore_eos": True, "stream": stream}
    if route == "chat":
        path, body["model"], body["messages"] = "/v1/chat/completions", model, [{"role": "user", "content": "hi"}]
    elif route == "completions":
        path, body["model"], body["prompt"] = "/v1/completions", model, "def main():"
    else:
        path, body["prompt"] = "/generate", "def main():"
    rec = {"kind": kind, "t0": time.monotonic(), "status": None, "headers": {}, "body": b"", "lines": []}
    try:
        with httpx.stream("POST", url + path, json=body, timeout=120) as r:
            rec["status"], rec["headers"] = r.status_code, dict(r.headers)
            if stream and r.status_code == 200:
                rec["lines"] = [x for x in r.iter_lines() if x]
            else:
                rec["body"] = r.read()
    except httpx.HTTPError as exc:  # e.g. a stream cut without an end: a failure the test reports
        rec["exc"] = f"{type(exc).__name__}: {exc}"
    rec["t1"] = time.monotonic()
    out.append(rec)


def _completed(rec: dict) -> bool:
    """A full answer: 200 and the finish of the request (a finish event, then [DONE], when streamed)."""
    if rec["status"] != 200 or "exc" in rec:
        return False
    if not rec["kind"].endswith("-sse"):
        doc = json.loads(rec["body"])
        return doc.get("finish_reason") == "length" or doc.get("choices", [{}])[0].get("finish_reason") == "length"
    lines = rec["lines"]
    if len(lines) < 3 or lines[-1] != "data: [DONE]":
        return False
    last = json.loads(lines[-2][6:])
    return last.get("type") == "finish" or bool(last.get("choices")) and last["choices"][0].get("finish_reason")


def _replica_gone(error: dict) -> bool:
    """sparsedial's JSON error for a request whose replica died (OpenAI's shape; sparsedial/deploy/proxy_errors.py)."""
    return (set(error) == {"message", "type", "param", "code"} and error["code"] == "replica_unavailable"
            and error["type"] == "service_unavailable" and "replica" in error["message"]
            and "retry" in error["message"])


def test_killed_replica_fails_only_its_in_flight_requests_with_a_json_error_and_restarts(clean):
    long: list = []
    threads = [threading.Thread(target=_long_request, args=(clean.url, clean.model, k, long)) for k in LONG_KINDS]
    for t in threads:
        t.start()
    view = clean.wait(lambda v: sum(x["running"] + x["waiting"] for x in v["replica_reports"]) == len(LONG_KINDS),
                      30, "every long request on a replica")
    victim = max(view["replica_reports"], key=lambda x: x["running"] + x["waiting"])
    (survivor,) = [x for x in view["replica_reports"] if x is not victim]
    on_victim = victim["running"] + victim["waiting"]
    time.sleep(0.5)  # the running requests have sent tokens: their streams have started (HTTP 200)
    os.kill(victim["pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    short: list = []  # new requests meanwhile: the survivor serves them (Serve routes away from the dead one)
    stop = threading.Event()

    def client(i: int) -> None:
        n = 0
        while not stop.is_set():
            _generate(clean.url, 32, short, (i, n))
            n += 1

    clients = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in clients:
        t.start()
    time.sleep(6)
    stop.set()
    for t in threads + clients:
        t.join()
    assert on_victim >= 1 and all(r["t1"] > killed_at for r in long), (view, long)  # all in flight at the kill
    ok = [r for r in long if _completed(r)]
    failed = [r for r in long if not _completed(r)]
    summary = sorted((r["kind"], r["status"], r["headers"].get("x-sparsedial-replica"), r.get("exc"),
                      (r["lines"][-2:] if r["lines"] else r["body"][:200])) for r in failed)
    # exactly the requests in flight on the victim failed, every other one was served by the survivor
    assert len(failed) == on_victim and len(ok) == len(LONG_KINDS) - on_victim, summary
    assert {r["headers"].get("x-sparsedial-replica") for r in ok} <= {survivor["replica"]}, summary
    # a stream starts (200) at its first token: one still queued in the engine fails like a plain request
    if victim["waiting"] == 0:
        assert all(r["status"] == 200 for r in failed if r["kind"].endswith("-sse")), summary
    for r in failed:  # each with sparsedial's JSON error
        if r["kind"].endswith("-sse") and r["status"] == 200:  # started: a last error event, then [DONE]
            assert r["headers"]["x-sparsedial-replica"] == victim["replica"], summary
            assert r["lines"][-1] == "data: [DONE]" and r["lines"][-2].startswith("data: {"), summary
            assert _replica_gone(json.loads(r["lines"][-2][6:])["error"]), summary
        else:
            assert r["status"] == 503 and r["headers"]["content-type"] == "application/json", summary
            assert r["headers"]["retry-after"] == "1", summary
            assert set(json.loads(r["body"])) == {"error"}, summary
            assert _replica_gone(json.loads(r["body"])["error"]), summary
    assert short and all(r[3] == 200 for r in short), [r for r in short if r[3] != 200]
    forms = ", ".join(sorted(f"{r['kind']} {r['status']}" for r in failed))
    print(f"\nkill: {on_victim} in flight on the victim, {len(failed)} JSON errors ({forms}), "
          f"{len(ok)} long ok on the survivor, "
          f"{len(short)} new requests ok after the kill")
    # Serve replaces the dead replica; the new one reports to the controller and serves
    v = clean.wait(lambda v: len(v["replica_reports"]) == 2 and victim["replica"] not in
                   {x["replica"] for x in v["replica_reports"]}
                   and all(x["policy_version"] == v["version"] for x in v["replica_reports"]),
                   120, "a restarted replica on the fleet's policy", every=0.5)
    assert len({x["pid"] for x in v["replica_reports"]} - {victim["pid"]}) == 2
    with ThreadPoolExecutor(4) as pool:  # and the fleet serves again on both
        served = list(pool.map(lambda _: clean.http.post("/generate", json={"prompt": "x", "max_tokens": 4}),
                               range(8)))
    assert all(r.status_code == 200 for r in served)
    assert {r.headers["x-sparsedial-replica"] for r in served} <= {x["replica"] for x in v["replica_reports"]}


def test_openai_client_retries_a_request_whose_replica_died(clean):
    """The official client with its default retries: a completion in flight on a replica that dies is answered
    503 (JSON, retry after 1 s), the client sends it again, a live replica serves it; the caller sees no error."""
    openai = pytest.importorskip("openai")
    answers: list = []  # every HTTP response the client got, retries included

    def hook(r) -> None:
        answers.append((r.status_code, r.headers.get("retry-after"), r.headers.get("content-type")))

    c = openai.OpenAI(base_url=clean.url + "/v1", api_key="unused",  # max_retries=2, openai-python's default
                      http_client=openai.DefaultHttpxClient(event_hooks={"response": [hook]}))
    out: dict = {}

    def call() -> None:
        try:
            raw = c.completions.with_raw_response.create(model=clean.model, prompt="def main():",
                                                         max_tokens=LONG_TOKENS, extra_body={"ignore_eos": True})
            out["replica"], out["completion"] = raw.headers.get("x-sparsedial-replica"), raw.parse()
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            out["exc"] = exc

    t = threading.Thread(target=call)
    t.start()
    view = clean.wait(lambda v: sorted(x["running"] + x["waiting"] for x in v["replica_reports"]) == [0, 1], 20,
                      "the one request running on a replica")
    (victim,) = [x for x in view["replica_reports"] if x["running"] + x["waiting"] == 1]
    os.kill(victim["pid"], signal.SIGKILL)
    t.join(120)
    assert "exc" not in out, out
    assert out["completion"].usage.completion_tokens == LONG_TOKENS
    assert out["replica"] and out["replica"] != victim["replica"]  # answered by another replica, after the retry
    assert answers == [(503, "1", "application/json"), (200, None, "application/json")], answers
