"""The fleet on Ray Serve under closed-loop load: fixed dense, fixed sparse and the fleet `auto` policy (plus
dense on one replica, the "add a replica" baseline), at several client counts.

Each client sends `/generate` requests back to back (the same code prompt, `--max-tokens` tokens, ignore_eos)
for `--seconds`; per row: requests, p50/p95 end-to-end latency, generated tokens/s over the window and the
tiers that served. One local Ray cluster (loopback); the app is redeployed only to change the replica count,
the policy changes through `PUT /admin/tier` as an operator would.

    .venv/bin/python benchmarks/bench_fleet.py                      # ~10 min on a 2-core machine
    .venv/bin/python benchmarks/bench_fleet.py --write-docs         # also replace the table in docs/deploy.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "stdlib-tiny-elastic"
TOKEN = "bench-fleet"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROMPT = "def parse_args(argv):\n    \"\"\"Parse the command line.\"\"\"\n"
BEGIN, END = "<!-- bench_fleet:begin -->", "<!-- bench_fleet:end -->"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def closed_loop(url: str, clients: int, seconds: float, max_tokens: int) -> dict:
    lat: list[float] = []
    tiers: Counter[str] = Counter()
    tokens, errors = 0, 0
    stop_at = time.monotonic() + seconds

    async def client(h: httpx.AsyncClient) -> None:
        nonlocal tokens, errors
        while time.monotonic() < stop_at:
            t0 = time.monotonic()
            r = await h.post("/generate", json={"prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True})
            if r.status_code != 200:
                errors += 1
                continue
            body = r.json()
            if time.monotonic() <= stop_at + 5:  # requests still finishing right after the window count too
                lat.append(time.monotonic() - t0)
                tokens += body["usage"]["completion_tokens"]
                tiers[body["tier"]] += 1

    t0 = time.monotonic()
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as h:
        await asyncio.gather(*(client(h) for _ in range(clients)))
    wall = time.monotonic() - t0
    q = statistics.quantiles(lat, n=20) if len(lat) >= 2 else [lat[0] if lat else 0.0] * 19
    return {"requests": len(lat), "errors": errors, "p50_s": statistics.median(lat) if lat else None,
            "p95_s": q[18], "tokens_per_s": tokens / wall, "tiers": dict(tiers)}


def set_policy(url: str, body: dict) -> None:
    r = httpx.put(url + "/admin/tier", json=body, headers=AUTH, timeout=30)
    r.raise_for_status()


def tiers_text(tiers: dict) -> str:
    total = sum(tiers.values()) or 1
    return ", ".join(f"{t} {100 * n / total:.0f}%" for t, n in sorted(tiers.items(), key=lambda kv: -kv[1]))


def table(rows: list[dict]) -> str:
    out = ["| setup | clients | requests | p50 latency (s) | p95 latency (s) | tokens/s | tiers served |",
           "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        out.append(f"| {r['setup']} | {r['clients']} | {r['requests']} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | "
                   f"{r['tokens_per_s']:.0f} | {tiers_text(r['tiers'])} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="1,4,8,16", help="comma list of closed-loop client counts")
    ap.add_argument("--seconds", type=float, default=15.0, help="window per row")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--slots", type=int, default=8, help="KV slots (max_running) per replica")
    ap.add_argument("--sparse", default="70%", help="the fixed sparse tier")
    ap.add_argument("--ladder", default="4=50%,8=70%", help="fleet auto ladder (fleet load=tier)")
    ap.add_argument("--hysteresis", type=float, default=2.0)
    ap.add_argument("--setups", default="single,dense,sparse,auto",
                    help="which of single (1 x dense), dense, sparse, auto (2 replicas each) to run")
    ap.add_argument("--write-docs", action="store_true", help="replace the table in docs/deploy.md")
    ap.add_argument("--json", type=Path, default=ROOT / "runs" / "bench_fleet.json")
    args = ap.parse_args()

    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    from sparsedial.deploy import FleetOptions, require_ray
    from sparsedial.deploy.app import deploy, server_overrides, start_local_cluster
    from sparsedial.deploy.options import parse_ladder

    require_ray()
    import ray
    from ray import serve

    clients = [int(c) for c in args.clients.split(",")]
    ladder = parse_ladder(args.ladder)
    auto = {"mode": "load", "default_tier": "dense", "hysteresis": args.hysteresis,
            "ladder": [{"threshold": t, "tier": n} for t, n in ladder]}
    every = {"single": (1, "dense", {"mode": "fixed", "default_tier": "dense"}),
             "dense": (2, "dense", {"mode": "fixed", "default_tier": "dense"}),
             "sparse": (2, args.sparse, {"mode": "fixed", "default_tier": args.sparse}),
             "auto": (2, "auto " + args.ladder, auto)}
    setups = [every[name] for name in args.setups.split(",")]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = server_overrides({"model": MODEL, "device": "cpu", "max_running": args.slots, "admin_token": TOKEN})
    load_before = os.getloadavg()
    rows: list[dict] = []
    started = False
    try:
        for replicas, name, policy in setups:
            opts = FleetOptions(replicas=replicas, replica_cpus=0.5, ladder=ladder, hysteresis=args.hysteresis,
                                server=server)
            if not started:
                start_local_cluster(opts, port=port)
                started = True
            if not rows or rows[-1]["replicas"] != replicas:
                deploy(opts)
                time.sleep(2)
                asyncio.run(closed_loop(url, 2, 3.0, 16))  # warm-up (tier materialization, JIT-free paths)
            set_policy(url, policy)
            for c in clients:
                r = asyncio.run(closed_loop(url, c, args.seconds, args.max_tokens))
                r.update(setup=f"{replicas} x {name}", replicas=replicas, clients=c)
                rows.append(r)
                print(f"{r['setup']:>24} clients {c:>3}: {r['requests']:>4} req, p50 {r['p50_s']:.2f} s, "
                      f"p95 {r['p95_s']:.2f} s, {r['tokens_per_s']:.0f} tok/s, {tiers_text(r['tiers'])}",
                      file=sys.stderr, flush=True)
                time.sleep(1.0)  # let the fleet drain (and auto step back down)
    finally:
        if started:
            serve.shutdown()
            ray.shutdown()
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, load average {load_before[0]:.1f} before the "
               f"run (shared with other jobs), Python {platform.python_version()}, ray {ray.__version__}")
    md = (f"{args.max_tokens} tokens per request (ignore_eos), {args.slots} KV slots per replica, one torch "
          f"thread per replica, {args.seconds:.0f} s per row; {machine}.\n\n{table(rows)}\n")
    print(md)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows, "machine": machine, "args": vars(args) | {"json": str(args.json)}},
                                    indent=1))
    if args.write_docs:
        doc = ROOT / "docs" / "deploy.md"
        text = doc.read_text()
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        doc.write_text(f"{head}{BEGIN}\n{md}{END}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
