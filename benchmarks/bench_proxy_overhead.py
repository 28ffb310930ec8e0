"""What sparsedial's proxy middleware (sparsedial/deploy/proxy_errors.py: JSON errors for requests whose replica
died) costs per request on the happy path.

Three measurements:
- in process: the middleware around a trivial ASGI app (a 2-message JSON response, and a 65-message SSE
  stream), called directly: the added CPU time per request, free of network and scheduling noise;
- under uvicorn: the same JSON app served by uvicorn on loopback with and without it, alternating blocks of
  sequential httpx requests;
- end to end: two local 1-replica Ray Serve fleets (the embedded model, two local clusters) up at once, one
  without and one with the middleware; sequential requests alternate between them (`GET /health`,
  `POST /generate` of 1 token, SSE `/generate` streams of 64 tokens), so both see the same machine load. At
  the end the replica of each is killed under a request, whose answer shows the setting took effect (JSON 503
  with the middleware, Serve's plain-text 500 without).

    .venv/bin/python benchmarks/bench_proxy_overhead.py               # ~4 min on a 2-core machine
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "stdlib-tiny-elastic"
TOKEN = "bench-proxy"


async def _json_app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"ok": true}'})


async def _sse_app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    for _ in range(64):
        await send({"type": "http.response.body", "body": b'data: {"type": "token"}\n\n', "more_body": True})
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


def in_process(n: int) -> dict[str, float]:
    from sparsedial.deploy.proxy_errors import ReplicaErrorMiddleware

    scope = {"type": "http", "method": "POST", "path": "/generate", "headers": []}

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(message):
        pass

    async def timed(app) -> float:
        for _ in range(200):
            await app(scope, receive, send)
        t0 = time.perf_counter()
        for _ in range(n):
            await app(scope, receive, send)
        return (time.perf_counter() - t0) / n * 1e6

    out = {}
    for name, app in (("json", _json_app), ("sse64", _sse_app)):
        base = min(asyncio.run(timed(app)) for _ in range(3))
        wrapped = min(asyncio.run(timed(ReplicaErrorMiddleware(app))) for _ in range(3))
        out[name] = wrapped - base
    return out


def under_uvicorn(n: int, blocks: int) -> dict[str, list[float]]:
    """Sequential requests to a trivial app served by uvicorn (LiveServer), with and without the middleware,
    in alternating blocks of n: per-request latency (s) of each."""
    from sparsedial.server.live import LiveServer

    from sparsedial.deploy.proxy_errors import ReplicaErrorMiddleware

    def lifespan(app):
        async def wrapped(scope, receive, send):
            if scope["type"] != "lifespan":
                return await app(scope, receive, send)
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})

        return wrapped

    out: dict[str, list[float]] = {"off": [], "on": []}
    with LiveServer(lifespan(_json_app)) as off, LiveServer(ReplicaErrorMiddleware(lifespan(_json_app))) as on:
        clients = {"off": httpx.Client(base_url=off.url), "on": httpx.Client(base_url=on.url)}
        for b in range(blocks):
            for name in ("off", "on") if b % 2 == 0 else ("on", "off"):
                h = clients[name]
                for _ in range(n):
                    t0 = time.perf_counter()
                    h.post("/generate").raise_for_status()
                    out[name].append(time.perf_counter() - t0)
        for h in clients.values():
            h.close()
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_setting(h: httpx.Client) -> str:
    """SIGKILL the replica under a long request: its answer says whether the middleware runs in the proxy."""
    (replica,) = h.get("/admin/fleet", headers={"Authorization": f"Bearer {TOKEN}"}).json()["replica_reports"]
    answer: list[httpx.Response] = []
    t = threading.Thread(target=lambda: answer.append(h.post("/generate", json={
        "prompt": "x", "max_tokens": 400, "ignore_eos": True})))
    t.start()
    time.sleep(1.0)
    os.kill(replica["pid"], signal.SIGKILL)
    t.join()
    r = answer[0]
    return f"{r.status_code} {r.headers.get('content-type')} {r.text[:60]!r}"


def serve_fleet(with_middleware: bool) -> int:
    """Child process: a local cluster + 1-replica fleet with or without the middleware; prints its port, serves
    until stdin closes."""
    import ray
    from ray import serve

    from sparsedial.deploy import FleetOptions
    from sparsedial.deploy.app import deploy, server_overrides, start_local_cluster
    from sparsedial.deploy.proxy_errors import CALLBACK, ENV_VAR

    os.environ[ENV_VAR] = CALLBACK if with_middleware else ""  # read by the proxy actor when it starts
    port = free_port()
    opts = FleetOptions(replicas=1, replica_cpus=0.5,
                        server=server_overrides({"model": MODEL, "device": "cpu", "max_running": 4,
                                                 "admin_token": TOKEN}))
    start_local_cluster(opts, port=port)
    try:
        deploy(opts)
        print(f"PORT {port}", flush=True)
        sys.stdin.read()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def paired(n: int, streams: int) -> tuple[dict[str, dict[str, list[float]]], dict[str, str]]:
    """Both fleets up at once (two local clusters); each request goes to one then the other (the order
    alternating), so both see the same machine load. Latencies (s) per setting and request kind."""
    procs, urls = {}, {}
    try:
        for name in ("off", "on"):
            procs[name] = subprocess.Popen([sys.executable, __file__, "--serve", name], stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, text=True)
            for line in procs[name].stdout:
                if line.startswith("PORT "):
                    urls[name] = f"http://127.0.0.1:{line.split()[1]}"
                    break
            else:
                raise RuntimeError(f"the {name} fleet did not start")
            # keep reading its output (Ray's logs) so that the child never blocks on a full pipe
            threading.Thread(target=procs[name].stdout.read, daemon=True).start()
        clients = {k: httpx.Client(base_url=u, timeout=60) for k, u in urls.items()}
        out: dict[str, dict[str, list[float]]] = {k: {"health": [], "generate1": [], "sse64": []} for k in urls}

        def timed(name: str, kind: str, fn) -> None:
            t0 = time.perf_counter()
            fn(clients[name])
            out[name][kind].append(time.perf_counter() - t0)

        def sse(h: httpx.Client) -> None:
            body = {"prompt": "x", "max_tokens": 64, "ignore_eos": True, "stream": True}
            with h.stream("POST", "/generate", json=body) as s:
                lines = [x for x in s.iter_lines() if x]
            assert lines[-1] == "data: [DONE]", lines[-3:]

        for h in clients.values():  # warm-up
            for _ in range(20):
                h.post("/generate", json={"prompt": "x", "max_tokens": 1}).raise_for_status()
        for i in range(n):
            for name in ("off", "on") if i % 2 == 0 else ("on", "off"):
                timed(name, "health", lambda h: h.get("/health").raise_for_status())
                timed(name, "generate1",
                      lambda h: h.post("/generate", json={"prompt": "x", "max_tokens": 1}).raise_for_status())
        for i in range(streams):
            for name in ("off", "on") if i % 2 == 0 else ("on", "off"):
                timed(name, "sse64", sse)
        checks = {name: check_setting(h) for name, h in clients.items()}
        for h in clients.values():
            h.close()
        return out, checks
    finally:
        for p in procs.values():
            p.stdin.close()
        for p in procs.values():
            p.wait(timeout=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000, help="health + generate(1 token) pairs per fleet")
    ap.add_argument("--streams", type=int, default=60, help="64-token SSE streams per fleet")
    ap.add_argument("--in-process", type=int, default=20000, help="direct ASGI calls per timing")
    ap.add_argument("--serve", choices=("on", "off"), help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args(argv)
    if args.serve:
        return serve_fleet(args.serve == "on")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    extra = in_process(args.in_process)
    print(f"in process, added CPU time per request: JSON response {extra['json']:.1f} us, "
          f"64-token SSE stream {extra['sse64']:.1f} us", flush=True)
    uv = under_uvicorn(500, 10)
    off, on = statistics.median(uv["off"]) * 1e6, statistics.median(uv["on"]) * 1e6
    print(f"uvicorn + httpx on loopback, trivial JSON app, {len(uv['on'])} requests each (alternating blocks): "
          f"p50 {off:.0f} us without, {on:.0f} us with the middleware ({on - off:+.0f} us)", flush=True)
    out, checks = paired(args.requests, args.streams)
    print(f"the killed replica's request: without {checks['off']}; with {checks['on']}")
    load = os.getloadavg()[0]
    print(f"\nend to end (two 1-replica fleets up at once, requests alternating between them; {platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {load:.1f} at the end, Python {sys.version.split()[0]})")
    print("| request | n each | p50 off (ms) | p50 on (ms) | difference (ms) | mean off (ms) | mean on (ms) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for k in out["off"]:
        a, b = out["off"][k], out["on"][k]
        off, on = statistics.median(a) * 1e3, statistics.median(b) * 1e3
        print(f"| {k} | {len(b)} | {off:.2f} | {on:.2f} | {on - off:+.2f} | {statistics.mean(a) * 1e3:.2f} "
              f"| {statistics.mean(b) * 1e3:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
