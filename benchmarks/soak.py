"""Question: does a running sparsedial server stay correct under many concurrent, partly hostile clients?

`clients` asyncio loops, for `seconds`, each pick at random (seeded): a valid request (/generate,
/v1/completions or /v1/chat/completions, JSON or streamed, small max_tokens, a listed tier, "auto", none or
an unlisted percent; temperature 1e-38 among them; some streams dropped after 1-3 events, "disconnected");
a victim (greedy, ignore_eos, explicit tier: its token ids must equal those of the same request run alone
before the soak); or an invalid request, which must get its 400/413/404 with an OpenAI error body. One admin
loop flips the default tier every 100 ms (each PUT must be 200).

Violations: a 5xx, a hang (REQUEST_TIMEOUT), a valid request refused (429 too, unless our own requests could
fill the waiting queue), an invalid one accepted or given another status, a victim whose tokens changed, an
error body not in OpenAI's shape, a stream with an error event or without [DONE].

    .venv/bin/python benchmarks/soak.py --seconds 60 --clients 64    # own in-process server (CPU)
    .venv/bin/python benchmarks/soak.py --url http://127.0.0.1:8000 --admin-token T --seconds 30
    .venv/bin/python benchmarks/soak.py --seconds 60 --write         # also docs/reliability_soak.md

Importable: `run_soak(url, admin_token, seconds, clients=64, seed=0) -> SoakReport` (tests/reliability).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REQUEST_TIMEOUT = 60.0  # a request unanswered this long is a hang
MAX_VIOLATIONS = 50  # messages kept; all are counted
BIG_BODY_EVERY_S = 2.0  # the 4.5 MB body is sent at most this often (it costs bandwidth, not insight)
PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:\n    def push(self, x):", "# sort a list\n",
           "for i in range(10):"]
UNLISTED = ["47%", "63%", "35%"]  # not in the checkpoint: materialized on demand, evicted from a small cache
VICTIM_TIERS = ("dense", "2:4")
PATHS = {"generate": "/generate", "completions": "/v1/completions", "chat": "/v1/chat/completions"}
ERROR_KEYS = {"message", "type", "param", "code"}
KINDS = ("valid", "victim", "invalid", "admin")
HELD = re.compile(r"^sparsedial_num_requests_(running|waiting)(?:\{[^}]*\})? (\S+)$", re.MULTILINE)  # /metrics gauges


@dataclass
class Reply:
    """One request's outcome: an HTTP status, or "disconnected" (we hung up), "timeout", "transport"."""

    status: int | str
    body: Any = None  # parsed JSON of a non-streamed reply (or an error)
    events: list[dict] = field(default_factory=list)  # SSE events of a streamed 200
    done: bool = False  # the stream ended with data: [DONE]


@dataclass
class SoakReport:
    seconds: float
    clients: int
    counts: Counter = field(default_factory=Counter)  # (kind, case, status) -> requests
    violations: list[str] = field(default_factory=list)
    n_violations: int = 0
    queue_full: int = 0  # 429s while the waiting queue really was full (not violations)

    @property
    def ok(self) -> bool:
        return self.n_violations == 0

    def total(self, kind: str | None = None, status: int | str | None = None) -> int:
        return sum(n for (k, _, s), n in self.counts.items()
                   if (kind is None or k == kind) and (status is None or s == status))

    def violation(self, message: str) -> None:
        self.n_violations += 1
        if len(self.violations) < MAX_VIOLATIONS:
            self.violations.append(message)

    def markdown(self) -> str:
        requests = self.total() - self.total("admin")
        head = (f"{requests} requests in {self.seconds:.0f} s ({requests / max(self.seconds, 1e-9):.1f}/s), "
                f"{self.clients} clients, {self.total('admin')} admin tier flips, "
                f"{self.total(status='disconnected')} streams dropped by the client, "
                f"{self.queue_full} legitimate 429s; **violations: {self.n_violations}**")
        by_kind = Counter()
        for (k, _, s), n in self.counts.items():
            by_kind[(k, "all cases", s)] += n
        return "\n\n".join([head, _table(by_kind), _table(self.counts)])


def _table(counts: Counter) -> str:
    """A markdown table: one row per (kind, case), one column per status seen (ints first)."""
    statuses = sorted({s for _, _, s in counts}, key=lambda s: (isinstance(s, str), str(s)))
    rows = sorted({(k, c) for k, c, _ in counts}, key=lambda r: (KINDS.index(r[0]), r[1]))
    lines = ["| kind | case | " + " | ".join(map(str, statuses)) + " | total |",
             "|---|---|" + "---:|" * (len(statuses) + 1)]
    for k, c in rows:
        cells = [counts.get((k, c, s), 0) for s in statuses]
        lines.append(f"| {k} | {c} | " + " | ".join(str(x or "") for x in cells) + f" | {sum(cells)} |")
    return "\n".join(lines)


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw[:200].decode("utf-8", "replace")


def _short(body: Any) -> str:
    text = body[:120].decode("utf-8", "replace") + "..." if isinstance(body, bytes) else json.dumps(body)
    return text if len(text) <= 240 else text[:240] + "..."


class Soak:
    """Shared state of one soak: the HTTP client, what the server serves, victims' references, the report."""

    def __init__(self, url: str, admin_token: str, http: httpx.AsyncClient, report: SoakReport) -> None:
        self.url, self.http, self.report = url.rstrip("/"), http, report
        self.auth = {"Authorization": f"Bearer {admin_token}"}
        self.model, self.tiers = "", []
        self.victims: list[dict] = []
        self.refs: list[list[int]] = []
        self.inflight = 0  # generation slots (n per request) our clients hold: decides if a 429 is legitimate
        self.last_big = 0.0
        self.big_body: bytes | None = None

    async def send(self, path: str, body: Any, *, stream: bool = False, close_after: int | None = None,
                   method: str = "POST", headers: dict | None = None) -> Reply:
        kw: dict = {"content": body, "headers": {"content-type": "application/json"}} \
            if isinstance(body, bytes) else {"json": body, "headers": headers}
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):  # the whole exchange, not one read
                if not stream:
                    r = await self.http.request(method, self.url + path, **kw)
                    return Reply(r.status_code, _json(r.content))
                async with self.http.stream(method, self.url + path, **kw) as r:
                    if r.status_code != 200:
                        return Reply(r.status_code, _json(await r.aread()))
                    return await _read_sse(r, close_after)
        except (TimeoutError, httpx.TimeoutException):
            return Reply("timeout")
        except httpx.TransportError as exc:
            return Reply("transport", f"{type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------------------------------- checks
    def check_error_body(self, what: str, body: Any) -> None:
        err = body.get("error") if isinstance(body, dict) else None
        if not (isinstance(err, dict) and ERROR_KEYS <= set(err) and isinstance(err["message"], str)
                and isinstance(err["type"], str)):
            self.report.violation(f"{what}: error body not in OpenAI shape: {_short(body)}")

    def check_answered(self, what: str, reply: Reply) -> bool:
        """A request that must succeed: True if it got a complete 200 (or we hung up), else a violation."""
        s = reply.status
        if s == "disconnected":
            return False
        if s == 429 and self.queue_really_full(reply):
            self.check_error_body(what, reply.body)
            self.report.queue_full += 1
            return False
        if s != 200:
            label = {"timeout": "hang", "transport": "connection failed"}.get(s) if isinstance(s, str) else \
                "server error" if s >= 500 else "refused"
            self.report.violation(f"{what}: {label} ({s}): {_short(reply.body)}")
            if isinstance(s, int):
                self.check_error_body(what, reply.body)
            return False
        errors = [e for e in reply.events if "error" in e]
        if errors:
            self.report.violation(f"{what}: error event in the stream: {_short(errors[0])}")
        elif reply.body is None and not reply.done:  # a streamed 200 that stopped short
            self.report.violation(f"{what}: stream ended without data: [DONE]")
        return not errors

    def queue_really_full(self, reply: Reply) -> bool:
        """A 429 is legitimate only if our clients hold at least as many requests as the queue's limit."""
        err = reply.body.get("error") if isinstance(reply.body, dict) else None
        limit = re.search(r"limit (\d+)", err.get("message", "")) if isinstance(err, dict) else None
        return bool(limit) and self.inflight >= int(limit.group(1))

    def check_tier(self, what: str, reply: Reply, tier: str | None) -> None:
        if tier in (None, "auto"):
            return
        found = [d["tier"] for d in [reply.body, *reply.events] if isinstance(d, dict) and d.get("tier")]
        if found != [tier] * len(found) or not found:
            self.report.violation(f"{what}: asked for tier {tier}, served {found or 'no tier'}")


async def _read_sse(r: httpx.Response, close_after: int | None) -> Reply:
    reply = Reply(200)
    async for line in r.aiter_lines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            reply.done = True
            break
        reply.events.append(json.loads(line[6:]))
        if close_after and len(reply.events) >= close_after:
            reply.status = "disconnected"  # leaving the `with` closes the connection mid-stream
            break
    return reply


# ---------------------------------------------------------------------------------------- request kinds
def _valid_request(s: Soak, rng: random.Random) -> tuple[str, str, dict, str | None, int]:
    """(case, path, body, tier asked for, n) of a random valid request."""
    ep = rng.choice(list(PATHS))
    tier = rng.choice([*s.tiers, "auto", None, *UNLISTED])
    temperature = rng.choice([0, 0.8, 1.0, 1e-38])
    body: dict = {"max_tokens": rng.randint(2, 24), "temperature": temperature, "stream": rng.random() < 0.5}
    prompt = rng.choice(PROMPTS)
    n = 1
    if ep == "generate":
        body["prompt"] = prompt
    else:
        body["model"] = s.model
        if ep == "completions":
            body["prompt"] = rng.choice([prompt, [5, 17, 99, 1024]])
            n = body["n"] = rng.choice([1, 1, 1, 2])
        else:
            body["messages"] = [{"role": "user", "content": prompt}]
            body["max_completion_tokens"] = body.pop("max_tokens")
        if body["stream"] and rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
    if tier is not None:
        if ep != "generate" and tier in s.tiers and rng.random() < 0.5:
            body["model"] = f"{s.model}@{tier}"  # the tier pinned by the model id instead of `sparsity`
        else:
            body["sparsity"] = tier
    case = "temperature 1e-38" if temperature == 1e-38 else f"{ep} {'stream' if body['stream'] else 'json'}"
    return case, PATHS[ep], body, tier, n


async def _valid(s: Soak, rng: random.Random) -> None:
    case, path, body, tier, n = _valid_request(s, rng)
    close_after = None
    if body["stream"] and rng.random() < 0.3:
        close_after = rng.randint(1, 3)
        body.update(ignore_eos=True, **{"max_completion_tokens" if "messages" in body else "max_tokens": 16})
    s.inflight += n
    try:
        reply = await s.send(path, body, stream=body["stream"], close_after=close_after)
    finally:
        s.inflight -= n
    s.report.counts[("valid", case, reply.status)] += 1
    what = f"valid {path} {_short(body)}"
    if s.check_answered(what, reply):
        s.check_tier(what, reply, tier)


async def victim_ids(s: Soak, body: dict) -> tuple[Reply, list[int]]:
    """Streamed /generate: the token ids come only with the stream's token events."""
    reply = await s.send("/generate", {**body, "stream": True}, stream=True)
    return reply, [e["token_id"] for e in reply.events if e.get("type") == "token"]


async def _victim(s: Soak, rng: random.Random) -> None:
    i = rng.randrange(len(s.victims))
    body = s.victims[i]
    s.inflight += 1
    try:
        reply, ids = await victim_ids(s, body)
    finally:
        s.inflight -= 1
    s.report.counts[("victim", f"tier {body['sparsity']}", reply.status)] += 1
    what = f"victim {_short(body)}"
    if s.check_answered(what, reply) and ids != s.refs[i]:
        at = next((j for j, (a, b) in enumerate(zip(ids, s.refs[i])) if a != b), min(len(ids), len(s.refs[i])))
        s.report.violation(f"{what}: tokens differ from the solo run at position {at}: got {ids}, "
                           f"expected {s.refs[i]}")


def invalid_cases(model: str) -> list[tuple[str, str, Any, int]]:
    """(case, path, body, expected status); a bytes body is sent raw as application/json."""
    g, c, ch = PATHS["generate"], PATHS["completions"], PATHS["chat"]
    msgs = [{"role": "user", "content": "hi"}]
    return [
        ("prompt id 10**9", g, {"prompt": [5, 10**9], "max_tokens": 2}, 400),
        ("prompt id -1", c, {"model": model, "prompt": [-1], "max_tokens": 2}, 400),
        ('max_tokens "2"', g, {"prompt": "x", "max_tokens": "2"}, 400),
        ('stream "yes"', ch, {"model": model, "messages": msgs, "stream": "yes"}, 400),
        ("unknown field", c, {"model": model, "prompt": "x", "sparsty": "50%"}, 400),
        ("17 stop strings", g, {"prompt": "x", "stop": [f"s{i}" for i in range(17)]}, 400),
        ("300-char stop", ch, {"model": model, "messages": msgs, "stop": "y" * 300}, 400),
        ("n=17", c, {"model": model, "prompt": "x", "n": 17, "max_tokens": 2}, 400),
        ("logprobs=21", c, {"model": model, "prompt": "x", "logprobs": 21, "max_tokens": 2}, 400),
        ("top_logprobs=21", ch, {"model": model, "messages": msgs, "logprobs": True, "top_logprobs": 21}, 400),
        ("tier 13:7", g, {"prompt": "x", "sparsity": "13:7"}, 400),
        ("model nope", ch, {"model": "nope", "messages": msgs}, 404),
        ("invalid JSON", g, b'{"prompt": "x", "max_tokens":', 400),
        ("lone surrogate", g, b'{"prompt": "\\ud800"}', 400),
        ("body 4.5 MB", c, None, 413),  # built once, when first sent
    ]


async def _invalid(s: Soak, rng: random.Random) -> None:
    cases = invalid_cases(s.model)
    case, path, body, expected = rng.choice(cases)
    if body is None:
        if time.monotonic() - s.last_big < BIG_BODY_EVERY_S:
            case, path, body, expected = rng.choice(cases[:-1])
        else:
            s.big_body = s.big_body or json.dumps({"model": s.model, "prompt": "a" * 4_500_000}).encode()
            s.last_big, body = time.monotonic(), s.big_body
    stream = isinstance(body, dict) and "stream" not in body and rng.random() < 0.5
    if stream:  # refused before any event, on the streaming path too
        body = {**body, "stream": True}
    reply = await s.send(path, body, stream=stream)
    s.report.counts[("invalid", case, reply.status)] += 1
    what = f"invalid ({case}) {path} {_short(body)}"
    if reply.status != expected:
        kind = "accepted" if isinstance(reply.status, int) and reply.status < 300 else "wrong answer"
        s.report.violation(f"{what}: {kind}: got {reply.status}, expected {expected}: {_short(reply.body)}")
    if isinstance(reply.status, int) and reply.status >= 400:
        s.check_error_body(what, reply.body)


async def _admin(s: Soak, rng: random.Random, deadline: float) -> None:
    while time.monotonic() < deadline:
        tier = rng.choice(s.tiers)
        reply = await s.send("/admin/tier", {"default_tier": tier}, method="PUT", headers=s.auth)
        s.report.counts[("admin", "PUT default_tier", reply.status)] += 1
        if reply.status != 200:
            s.report.violation(f"admin PUT default_tier={tier}: got {reply.status}: {_short(reply.body)}")
        await asyncio.sleep(0.1)


async def _client(s: Soak, rng: random.Random, deadline: float) -> None:
    while time.monotonic() < deadline:
        r = rng.random()
        await (_victim if r < 0.15 else _valid if r < 0.6 else _invalid)(s, rng)


# --------------------------------------------------------------------------------------------- the soak
async def _setup(s: Soak) -> str:
    """Learn the model and tiers, compute the victims' solo references; returns the default tier to restore."""
    health = (await s.http.get(s.url + "/health")).json()
    models = (await s.http.get(s.url + "/v1/models")).json()["data"]
    s.model = next(m["id"] for m in models if m.get("tier") is None)
    s.tiers = [m["id"].split("@", 1)[1] for m in models if m.get("tier")] or health["tiers"]
    s.victims = [{"prompt": p, "max_tokens": 16, "temperature": 0, "ignore_eos": True, "sparsity": t}
                 for t in VICTIM_TIERS if t in s.tiers for p in PROMPTS[:4]]
    for body in s.victims:
        reply, ids = await victim_ids(s, body)
        if reply.status != 200 or len(ids) != body["max_tokens"]:
            raise RuntimeError(f"victim reference failed: {reply.status} {_short(reply.body)}")
        s.refs.append(ids)
    state = await s.http.get(s.url + "/admin/tier", headers=s.auth)
    if state.status_code != 200:
        raise RuntimeError(f"GET /admin/tier: {state.status_code} {state.text[:200]} (admin token?)")
    return state.json()["default_tier"]


async def soak(url: str, admin_token: str, seconds: float, clients: int = 64, seed: int = 0) -> SoakReport:
    report = SoakReport(seconds=seconds, clients=clients)
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(limits=limits, timeout=REQUEST_TIMEOUT) as http:
        s = Soak(url, admin_token, http, report)
        default_tier = await _setup(s)
        start = time.monotonic()
        deadline = start + seconds
        loops = [_client(s, random.Random(seed * 10_000 + i), deadline) for i in range(clients)]
        await asyncio.gather(*loops, _admin(s, random.Random(seed * 10_000 - 1), deadline))
        report.seconds = time.monotonic() - start  # includes the drain of requests begun before the deadline
        await s.send("/admin/tier", {"default_tier": default_tier}, method="PUT", headers=s.auth)
        health = await s.send("/health", None, method="GET")
        if health.status != 200:
            report.violation(f"/health after the soak: {health.status} {_short(health.body)}")
        await _check_drained(s)
    return report


async def _check_drained(s: Soak, within_s: float = 10.0) -> None:
    """Every client is done, so nothing may still run or wait: a dropped stream must have freed its slot."""
    deadline = time.monotonic() + within_s
    while True:
        text = (await s.http.get(s.url + "/metrics")).text
        held = {name: float(v) for name, v in HELD.findall(text)}
        if not any(held.values()) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    if set(held) != {"running", "waiting"}:  # the check must not pass because the gauges went missing
        s.report.violation(f"/metrics lacks the running/waiting gauges (found {sorted(held)})")
    elif any(held.values()):
        s.report.violation(f"{within_s:g} s after the last client finished the engine still holds {held}")


def run_soak(url: str, admin_token: str, seconds: float, clients: int = 64, seed: int = 0) -> SoakReport:
    """Soak the server at `url` for `seconds` (plus the drain) with `clients` loops and one admin loop."""
    return asyncio.run(soak(url, admin_token, seconds, clients, seed))


# ----------------------------------------------------------------------------------------------- the CLI
def _own_server(admin_token: str):
    """A real AsyncEngine on the embedded elastic model behind real uvicorn (loopback, free port)."""
    from sparsedial.engine import AsyncEngine, EngineConfig
    from sparsedial.server import ServerSettings, create_app
    from sparsedial.server.live import LiveServer

    model = Path(__file__).resolve().parent.parent / "models" / "stdlib-tiny-elastic"
    engine = AsyncEngine(EngineConfig(model=model, device="cpu"))
    app = create_app(ServerSettings(model=model, admin_token=admin_token), engine=engine)
    return engine, LiveServer(app, engine).start()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--url", help="soak this server instead of starting one in-process")
    ap.add_argument("--admin-token", default="soak-admin", help="its admin token (with --url)")
    ap.add_argument("--write", action="store_true", help="write the table to docs/reliability_soak.md")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _report import DOCS, machine, write_section

    engine = server = None
    if args.url is None:
        engine, server = _own_server(args.admin_token)
    try:
        report = run_soak(args.url or server.url, args.admin_token, args.seconds, args.clients, args.seed)
    finally:
        if server is not None:
            server.stop()
            engine.shutdown()
    where = args.url or "in-process server, embedded stdlib-tiny-elastic, CPU"
    body = (f"`benchmarks/soak.py --seconds {args.seconds:g} --clients {args.clients} --seed {args.seed}` "
            f"({where}) on {machine()}\n\n{report.markdown()}")
    print(body)
    for v in report.violations:
        print("VIOLATION:", v)
    if args.write:
        write_section(DOCS / "reliability_soak.md", "soak", body, "Reliability soak")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
