"""The 2-replica Ray Serve fleet end to end: the official openai client, admin tier changes on every replica,
cancellation on client disconnect, the fleet `auto` policy under load, and a replica killed under load."""

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


def test_killed_replica_loses_only_its_in_flight_requests_and_restarts(clean):
    before = clean.view()["replica_reports"]
    victim = before[0]
    results: list = []
    stop = threading.Event()

    def client(i: int) -> None:  # a steady stream of short requests, before, during and after the kill
        n = 0
        while not stop.is_set():
            _generate(clean.url, 48, results, (i, n))
            n += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(3)
    in_flight = {x["replica"]: x["running"] + x["waiting"] for x in clean.view()["replica_reports"]}
    os.kill(victim["pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    time.sleep(6)
    stop.set()
    for t in threads:
        t.join()
    failed = [r for r in results if r[3] != 200]
    ok = [r for r in results if r[3] == 200]
    # only requests in flight at the kill failed, each with an HTTP error and a message
    assert all(r[1] <= killed_at <= r[2] for r in failed), failed
    assert len(failed) <= max(in_flight.get(victim["replica"], 0), 6), (failed, in_flight)
    assert all(r[3] is not None and r[3] >= 500 and r[4] for r in failed), failed
    assert sum(r[1] > killed_at for r in ok) >= 6  # the survivor kept serving new requests meanwhile
    print(f"\nkill: {len(ok)} ok, {len(failed)} failed (in flight on the victim: "
          f"{in_flight.get(victim['replica'])}): {sorted({(r[3], str(r[4])[:120]) for r in failed})}")
    # Serve replaces the dead replica; the new one reports to the controller and serves
    v = clean.wait(lambda v: len(v["replica_reports"]) == 2 and victim["replica"] not in
                   {x["replica"] for x in v["replica_reports"]}
                   and all(x["policy_version"] == v["version"] for x in v["replica_reports"]),
                   120, "a restarted replica on the fleet's policy", every=0.5)
    assert len({x["pid"] for x in v["replica_reports"]} - {victim["pid"]}) == 2
    with ThreadPoolExecutor(4) as pool:  # and the fleet serves again on both
        assert all(c == 200 for c in pool.map(lambda _: clean.http.post(
            "/generate", json={"prompt": "x", "max_tokens": 4}).status_code, range(8)))
