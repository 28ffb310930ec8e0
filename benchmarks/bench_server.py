"""Question: how does the HTTP server hold up under load per tier, does the `load` policy escalate sparsity
as load grows and hold p95 better than fixed dense, and what does HTTP add over calling the engine?

A bounded closed-loop load test over loopback only (127.0.0.1): for each tier and for `auto` under a load
ladder, `--concurrency` workers (default 1,4,16,64) each send /generate requests back to back for
`--duration` seconds; then it stops. Results: a markdown table into docs/benchmarks.md section "server",
p95-vs-concurrency and throughput plots (docs/figures/server_*.png), and an optional CSV.

    .venv/bin/python benchmarks/bench_server.py                  # embedded model, ~1-2 minutes on a CPU
    .venv/bin/python benchmarks/bench_server.py --duration 1 --concurrency 1,8 --tiers dense,50%

When the model serves only "dense" (the plain embedded model), `--build-tiers` (default on) first writes a
nested-mask elastic checkpoint of it (no LoRA training: `compress_epts` with epochs=0) into a temp dir, so
that there are tiers to serve; mask quality does not matter for a latency benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import statistics
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import uvicorn
from _report import DOCS, machine, write_section
from sparsedial.engine import AsyncEngine, EngineConfig, SamplingParams
from sparsedial.server import ServerSettings, create_app

PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    "
ADMIN = "bench-admin-token"


@dataclass
class Result:
    config: str
    concurrency: int
    latencies: list[float] = field(default_factory=list)
    tokens: int = 0
    wall: float = 0.0
    tiers: Counter = field(default_factory=Counter)
    errors: int = 0

    def pct(self, q: float) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    def row(self) -> dict:
        return {"config": self.config, "concurrency": self.concurrency, "requests": len(self.latencies),
                "req_s": len(self.latencies) / self.wall, "tok_s": self.tokens / self.wall,
                "p50_ms": 1e3 * self.pct(0.50), "p95_ms": 1e3 * self.pct(0.95), "p99_ms": 1e3 * self.pct(0.99),
                "errors": self.errors, "tiers": " ".join(f"{t}:{n}" for t, n in sorted(self.tiers.items()))}


class Loopback:
    """uvicorn on 127.0.0.1 (free port) in a thread; stopped by `close()`."""

    def __init__(self, app) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


async def closed_loop(url: str, config: str, sparsity: str, conc: int, duration: float, max_tokens: int) -> Result:
    res = Result(config, conc)
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "sparsity": sparsity}
    limits = httpx.Limits(max_connections=conc + 4, max_keepalive_connections=conc + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        t_end = time.perf_counter() + duration

        async def worker() -> None:
            while time.perf_counter() < t_end:
                t0 = time.perf_counter()
                r = await client.post("/generate", json=body)
                if r.status_code != 200:
                    res.errors += 1
                    await asyncio.sleep(0.05)
                    continue
                data = r.json()
                res.latencies.append(time.perf_counter() - t0)
                res.tokens += data["usage"]["completion_tokens"]
                res.tiers[data["tier"]] += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conc)))
        res.wall = time.perf_counter() - t0
    return res


def set_policy(url: str, payload: dict) -> None:
    r = httpx.put(f"{url}/admin/tier", json=payload, headers={"Authorization": f"Bearer {ADMIN}"})
    r.raise_for_status()


async def http_overhead(url: str, engine: AsyncEngine, n: int, max_tokens: int) -> tuple[float, float]:
    """Mean seconds per request, sequential and interleaved (so drift hits both): POST /generate vs
    engine.submit from this process, after one warm-up of each."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "sparsity": "dense"}
    direct, over = [], []
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        for i in range(n + 1):
            t0 = time.perf_counter()
            async for _ev in engine.submit(PROMPT, params, "dense"):
                pass
            t1 = time.perf_counter()
            (await client.post("/generate", json=body)).raise_for_status()
            t2 = time.perf_counter()
            if i:  # the first round warms both paths
                direct.append(t1 - t0)
                over.append(t2 - t1)
    return statistics.median(direct), statistics.median(over)


def ensure_tiers(model: Path, build: bool, tmp: Path) -> Path:
    """`model`, or a nested-mask elastic checkpoint of it when it serves only dense."""
    if (model / "elastic.json").is_file() or not build:
        return model
    from sparsedial.compress.calibration import CalibrationConfig
    from sparsedial.compress.epts import EPTSConfig
    from sparsedial.compress.pipeline import compress_epts

    out = tmp / f"{model.name}-nested"
    print(f"{model} has no tiers: building nested masks (no LoRA) into {out}")
    compress_epts(model, out, ["dense", "30%", "50%", "70%", "2:4"], CalibrationConfig(n_samples=8, seq_len=128),
                  EPTSConfig(epochs=0), progress=False)
    return out


def ladder_for(tiers: list[str], max_batch: int, spec: str | None = None) -> list[dict]:
    """Load ladder over waiting+running requests: `spec` ("8:80%,32:90%"), or by default step up once the
    batch is half full, then at each multiple of the batch size, through the unstructured tiers in order."""
    if spec:
        steps = [part.split(":", 1) for part in spec.split(",")]
        return [{"threshold": int(th), "tier": t} for th, t in steps]
    sparse = [t for t in tiers if t.endswith("%")]
    thresholds = [max_batch // 2, max_batch, 2 * max_batch, 3 * max_batch]
    return [{"threshold": th, "tier": t} for th, t in zip(thresholds, sparse)]


def run_load(url: str, configs: list[tuple[str, str]], conc: list[int], duration: float, max_tokens: int,
             ladder: list[dict]) -> list[Result]:
    results = []
    for name, sparsity in configs:
        if name == "auto (load)":
            set_policy(url, {"default_tier": "dense", "mode": "load", "ladder": ladder,
                             "hysteresis": 1})
        else:
            set_policy(url, {"default_tier": "dense", "mode": "fixed"})
        asyncio.run(closed_loop(url, "warm-up", sparsity, 2, min(duration, 1.0), max_tokens))
        for c in conc:
            r = asyncio.run(closed_loop(url, name, sparsity, c, duration, max_tokens))
            row = r.row()
            print(f"{name:>12} c={c:<3} {row['req_s']:7.2f} req/s {row['tok_s']:8.1f} tok/s  p50 {row['p50_ms']:7.1f}"
                  f"  p95 {row['p95_ms']:7.1f}  p99 {row['p99_ms']:7.1f} ms  err {r.errors}  {row['tiers']}")
            results.append(r)
    return results


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(r.config for r in results):
        rs = [r for r in results if r.config == name]
        xs = [r.concurrency for r in rs]
        style = dict(marker="o", lw=2.5 if name.startswith("auto") else 1.2)
        a.plot(xs, [1e3 * r.pct(0.95) for r in rs], label=name, **style)
        b.plot(xs, [r.row()["tok_s"] for r in rs], label=name, **style)
    for ax, title in ((a, "p95 latency (ms)"), (b, "throughput (generated tok/s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    a.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results: list[Result], overhead: tuple[float, float], model: str, args: argparse.Namespace,
           ladder: list[dict]) -> str:
    rows = [r.row() for r in results]
    lines = [f"Machine: {machine()}", "",
             f"`benchmarks/bench_server.py`: model `{model}`, closed loop over 127.0.0.1, {args.duration:g} s per "
             f"point, /generate with {args.max_tokens} greedy tokens (ignore_eos), engine max_batch "
             f"{args.max_batch}, model-thread torch threads {args.cpu_threads or 'torch default'}. `auto (load)` ladder on waiting+running requests: "
             + ", ".join(f"≥{s['threshold']} → {s['tier']}" for s in ladder) + " (hysteresis 1).", "",
             "| config | clients | req/s | tok/s | p50 ms | p95 ms | p99 ms | errors | tiers served |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['concurrency']} | {r['req_s']:.2f} | {r['tok_s']:.1f} | {r['p50_ms']:.1f} "
                     f"| {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | {r['tiers']} |")
    direct, http = overhead
    lines += ["", f"HTTP overhead (sequential, dense, {args.max_tokens} tokens, median of {args.overhead_n}): "
                  f"engine.submit {1e3 * direct:.1f} ms, POST /generate {1e3 * http:.1f} ms, "
                  f"overhead {1e3 * (http - direct):.1f} ms per request. The server runs in a thread of the "
                  "benchmark process, so client, server and engine threads share one GIL on this machine.", "",
              "![server p95 and throughput](figures/server_load.png)"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="model dir (default: the server's default model)")
    ap.add_argument("--no-build-tiers", dest="build_tiers", action="store_false")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per (config, concurrency) point")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--tiers", default=None, help="fixed tiers to run (default: dense, the sparsest %% tier, 2:4)")
    ap.add_argument("--ladder", default=None, help="auto policy ladder, e.g. 8:80%%,32:90%% (threshold:tier)")
    ap.add_argument("--cpu-threads", type=int, default=1, help="model-thread torch threads on CPU (0: leave as is)")
    ap.add_argument("--overhead-n", type=int, default=20)
    ap.add_argument("--csv", type=Path, default=None)
    ap.add_argument("--no-write", dest="write", action="store_false", help="print only; leave docs alone")
    args = ap.parse_args()
    conc = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model = ensure_tiers(args.model or ServerSettings().model, args.build_tiers, Path(tmp))
        engine = AsyncEngine(EngineConfig(model=model, device="cpu" if args.model is None else "auto",
                                          max_batch=args.max_batch, max_waiting=4096,
                                          cpu_threads=args.cpu_threads or None))
        srv = Loopback(create_app(ServerSettings(model=model, admin_token=ADMIN), engine=engine))
        try:
            tiers = engine.tiers
            fixed = args.tiers.split(",") if args.tiers else \
                list(dict.fromkeys(["dense"] + [t for t in tiers if t.endswith("%")][-1:] + [t for t in tiers if ":" in t]))
            configs = [(t, t) for t in fixed] + ([("auto (load)", "auto")] if len(tiers) > 1 else [])
            print(f"machine: {machine()}\nmodel {model.name}, tiers {tiers}, configs {[c for c, _ in configs]}")
            ladder = ladder_for(tiers, args.max_batch, args.ladder)
            results = run_load(srv.url, configs, conc, args.duration, args.max_tokens, ladder)
            overhead = asyncio.run(http_overhead(srv.url, engine, args.overhead_n, args.max_tokens))
            print(f"HTTP overhead: direct {1e3 * overhead[0]:.1f} ms, http {1e3 * overhead[1]:.1f} ms")
        finally:
            srv.close()
            engine.shutdown()
    if args.csv:
        with args.csv.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(results[0].row()))
            w.writeheader()
            w.writerows(r.row() for r in results)
    if args.write:
        plot(results, DOCS / "figures" / "server_load.png")
        body = report(results, overhead, model.name, args, ladder)
        write_section(DOCS / "benchmarks.md", "server", "## Server under load\n\n" + body, "Benchmarks")
        print("wrote docs/benchmarks.md (section server) and docs/figures/server_load.png")


if __name__ == "__main__":
    main()
