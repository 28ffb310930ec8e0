"""How much do on-demand tier builds slow down a concurrent request, with and without the TierBuilder thread?

A tier the checkpoint does not list (e.g. "47%") is built on first use: by `EngineConfig(tier_builder=True)`
(the default) on the `sparsedial-tier-builder` thread, by `tier_builder=False` on the model thread inside a
step (the old way, stalling every request in flight). `AsyncEngine` on `models/stdlib-tiny-elastic`, CPU,
driven with asyncio (no HTTP); rounds alternate the modes; a fresh engine with a cold on-demand cache per
phase, one model load shared. The victim: one greedy request, ignore_eos, N tokens at "dense"; the gaps
between its tokens' arrivals at the event loop. Phases:

* alone: the victim only;
* spin (control): a plain thread builds unlisted tiers back to back (never installed) while the victim runs:
  what builds cost the model thread through the shared cores and the GIL, with no client rows in its steps
  (the mode plays no part here);
* listed (control): K clients, each asking again and again for 2 tokens at the next tier of the listed,
  resident 30%..90%: the cost of client rows in the victim's steps, with no builds;
* unlisted: the same clients at the unlisted "31%".."89%", so that with `cache_tiers=4` builds and evictions
  never stop. Clients stop when the victim finishes.

Tiers built = every `ElasticModel.build_tier` call while the victim ran, on either thread (the builder's own
`builds` is checked against it). Usage:
    python benchmarks/bench_tier_builds.py [--quick] [--rounds R] [--tokens N] [--clients K] [--cpu-threads T]
                                           [--write]
`--write` writes docs/bench_tier_builds.md and .csv.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import itertools
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import DOCS, machine  # noqa: E402
from sparsedial.engine.api import FinishEvent, TokenEvent  # noqa: E402
from sparsedial.engine.async_engine import AsyncEngine  # noqa: E402
from sparsedial.engine.elastic import ElasticModel  # noqa: E402
from sparsedial.engine.runner import EngineConfig  # noqa: E402
from sparsedial.engine.sampling import SamplingParams  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "stdlib-tiny-elastic"
VICTIM_PROMPT = "def parse_args(argv):\n    "
CLIENT_PROMPTS = ["import os\n", "class Node:", "for i in range(", "return ", "# Copyright", "try:\n    ",
                  "with open(path) as f:", "x = ["]
MODES = {"builder thread": True, "inline (old)": False}


def pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile q in [0, 100]."""
    return sorted(xs)[min(len(xs) - 1, max(0, round(q / 100 * len(xs) + 0.5) - 1))]


def unlisted_tiers(em: ElasticModel, lo: int = 31, hi: int = 89) -> list[str]:
    """The percents lo..hi the checkpoint does not list, resolved (so build_tier knows their specs)."""
    return [em.resolve(f"{p}%").name for p in range(lo, hi + 1) if f"{p}%" not in em.tiers]


def cpu_seconds() -> tuple[float, float, float]:
    """(wall, busy CPU seconds of the whole machine, CPU seconds of this process) now; Linux /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait
    t = os.times()
    return time.perf_counter(), busy, t.user + t.system


class BuildCounter:
    """Wraps em.build_tier (both the builder thread and the inline path call it): names built, in order."""

    def __init__(self, em: ElasticModel) -> None:
        self.em, self.orig, self.names = em, em.build_tier, []
        em.build_tier = self._build  # instance attribute: shadows the method for both callers

    def _build(self, name: str):
        try:
            return self.orig(name)
        finally:
            self.names.append(name)

    def restore(self) -> None:
        del self.em.build_tier


async def victim(engine: AsyncEngine, tokens: int) -> list[float]:
    """Arrival times (perf_counter) of each of the victim's tokens."""
    arrivals: list[float] = []
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    async for ev in engine.submit(VICTIM_PROMPT, params, "dense"):
        if isinstance(ev, TokenEvent):
            arrivals.append(time.perf_counter())
        elif isinstance(ev, FinishEvent):
            assert ev.finish_reason == "length" and ev.completion_tokens == tokens, ev
    return arrivals


async def client(engine: AsyncEngine, i: int, tiers, stop: asyncio.Event, lat: list[float]) -> None:
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    while not stop.is_set():
        start = time.perf_counter()
        async for ev in engine.submit(CLIENT_PROMPTS[i % len(CLIENT_PROMPTS)], params, next(tiers)):
            if isinstance(ev, FinishEvent):
                assert ev.finish_reason == "length", ev
        lat.append(time.perf_counter() - start)


def spin_builds(build, names: list[str], threads: int, stop: threading.Event) -> None:
    """Control: build (never install) tiers back to back on a plain thread, as the TierBuilder would."""
    torch.set_num_threads(threads)
    for name in itertools.cycle(names):
        if stop.is_set():
            return
        build(name)


async def phase(engine: AsyncEngine, counter: BuildCounter, names: list[str], k: int, tokens: int,
                spin: int = 0) -> dict:
    """The victim with k clients cycling through `names` (no clients when k == 0); with `spin` (the torch
    threads), a thread building the tiers of `names` nonstop meanwhile instead."""
    tiers, stop, lat = itertools.cycle(names), asyncio.Event(), []
    counter.names.clear()
    start = time.perf_counter()
    spin_stop = threading.Event()
    spinner = threading.Thread(target=spin_builds, args=(counter.em.build_tier, names, spin, spin_stop))
    if spin:
        spinner.start()
    clients = [asyncio.create_task(client(engine, i, tiers, stop, lat)) for i in range(k)]
    if k:
        await asyncio.sleep(0.05)  # the clients' first requests are in
    arrivals = await asyncio.wait_for(victim(engine, tokens), timeout=600)
    elapsed = time.perf_counter() - start
    stop.set()
    spin_stop.set()
    done, built = len(lat), list(counter.names)  # while the victim ran
    if spin:
        spinner.join()
    await asyncio.gather(*clients)
    return {"gaps": [(b - a) * 1e3 for a, b in itertools.pairwise(arrivals)], "builds": len(built),
            "distinct": len(set(built)), "builds_s": len(built) / elapsed, "req_s": done / elapsed,
            "lat_ms": statistics.mean(lat[:done]) * 1e3 if done else float("nan")}


async def one_round(em: ElasticModel, mode: bool, tokens: int, k: int, threads: int, offset: int) -> dict:
    """Each phase on a fresh engine with a cold on-demand cache; returns {phase: measurements}."""
    unlisted = unlisted_tiers(em)
    unlisted = unlisted[offset % len(unlisted):] + unlisted[:offset % len(unlisted)]
    listed = [t for t in em.tiers if t.endswith("%")]
    out = {}
    for ph, names, clients, spin in (("alone", [], 0, 0), ("spin", unlisted, 0, threads), ("listed", listed, k, 0),
                                     ("unlisted", unlisted, k, 0)):
        for name in list(em._cache):  # on-demand tiers of the previous engine: start cold
            em.drop_tier(name)
        cfg = EngineConfig(model=MODEL, device="cpu", max_batch=8, cache_tiers=4, tier_builder=mode,
                           cpu_threads=threads)
        engine, counter = AsyncEngine(cfg, model=em), BuildCounter(em)
        try:
            await victim(engine, 8)  # warm-up: starts the model thread
            out[ph] = await phase(engine, counter, names, clients, tokens, spin)
            builder_builds = engine.builder.builds
        finally:
            engine.shutdown()
            counter.restore()
        if mode and ph == "unlisted":  # the builder's own count (it also counts builds finished after the victim)
            assert builder_builds >= out[ph]["builds"] - 1, (builder_builds, out[ph]["builds"])
    return out


PHASES = {"alone": "victim alone", "spin": "+ a thread building tiers nonstop (no clients)",
          "listed": "+ clients, listed tiers (no builds)", "unlisted": "+ clients, unlisted tiers (builds)"}


def summarize(mode: str, rnd: str, rs: list[dict]) -> list[dict]:
    """One row per phase; gaps pooled over the rounds in `rs`, the other columns means per round."""
    rows = []
    for ph in PHASES:
        g = list(itertools.chain.from_iterable(r[ph]["gaps"] for r in rs))
        row = {"mode": mode, "round": rnd, "phase": ph, "median_ms": statistics.median(g), "p95_ms": pct(g, 95),
               "max_ms": max(g)}
        for s in ("median", "p95", "max"):
            row[f"slowdown_{s}"] = row[f"{s}_ms"] / rows[0][f"{s}_ms"] if rows else 1.0
        for key in ("builds", "distinct", "builds_s", "req_s", "lat_ms"):
            row[key] = statistics.mean(r[ph][key] for r in rs)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> list[str]:
    out = [("| mode | round | victim phase | gap median (ms) | p95 | max | slowdown vs alone (median / p95 / max) "
            "| tiers built (distinct) | builds/s | client req/s | client latency (ms) |"),
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        x = " / ".join(f"{r[f'slowdown_{s}']:.2f}x" for s in ("median", "p95", "max"))
        cl = "" if r["phase"] in ("alone", "spin") else f"{r['req_s']:.1f} | {r['lat_ms']:.0f}"
        out.append(f"| {r['mode']} | {r['round']} | {PHASES[r['phase']]} | {r['median_ms']:.1f} | {r['p95_ms']:.1f} "
                   f"| {r['max_ms']:.1f} | {x} | {r['builds']:.0f} ({r['distinct']:.0f}) | {r['builds_s']:.1f} "
                   f"| {cl or ' | '} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 round, 60 victim tokens, 4 clients")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per mode, interleaved (default 3)")
    ap.add_argument("--tokens", type=int, default=200, help="victim tokens (default 200)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent tier-hopping clients (default 8)")
    ap.add_argument("--cpu-threads", type=int, default=1,
                    help="EngineConfig.cpu_threads: torch threads of the model and builder threads (default 1)")
    ap.add_argument("--write", action="store_true", help="write docs/bench_tier_builds.md and .csv")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.tokens, args.clients = 1, 60, 4
    torch.set_num_threads(1)
    load0, cpu0 = os.getloadavg()[0], cpu_seconds()
    em = ElasticModel.load(MODEL, dtype="float32", device="cpu", cache_tiers=4)
    mach = f"Machine: {machine()}; engine threads: cpu_threads={args.cpu_threads}"
    print(mach, flush=True)
    results: dict[str, list[dict]] = {m: [] for m in MODES}
    rows = []
    for rnd in range(args.rounds):
        for mode, flag in (MODES.items() if rnd % 2 == 0 else reversed(MODES.items())):
            r = asyncio.run(one_round(em, flag, args.tokens, args.clients, args.cpu_threads, offset=7 * rnd))
            results[mode].append(r)
            rows += summarize(mode, str(rnd + 1), [r])
            print("\n".join(table(rows[-len(PHASES):])[2:]), flush=True)
    summary = [row for m, rs in results.items() for row in summarize(m, "all", rs)]
    (w0, b0, m0), (w1, b1, m1) = cpu0, cpu_seconds()
    mach += (f"; other processes used {((b1 - b0) - (m1 - m0)) / (w1 - w0):.2f} cores on average during the run "
             f"(this one {(m1 - m0) / (w1 - w0):.2f}; 1-min load average {load0:.2f} before, "
             f"{os.getloadavg()[0]:.2f} after)")
    about = (f"`models/stdlib-tiny-elastic`, fp32, CPU, `AsyncEngine(max_batch=8, cache_tiers=4)`; victim: greedy, "
             f"{args.tokens} tokens at dense; {args.clients} clients asking for 2 tokens at a time; {args.rounds} "
             f"round(s) per mode, interleaved (phases: see the script's docstring). 'all' pools the rounds' gaps; "
             f"the other columns are means per round, counted while the victim ran.")
    got = {(r["mode"], r["phase"]): r for r in summary}
    new, old = got["builder thread", "unlisted"], got["inline (old)", "unlisted"]
    verdict = (f"Under builds, the victim's gap median / p95 / max: {old['median_ms']:.1f} / {old['p95_ms']:.1f} / "
               f"{old['max_ms']:.1f} ms inline, {new['median_ms']:.1f} / {new['p95_ms']:.1f} / {new['max_ms']:.1f} ms "
               f"with the builder thread; clients {old['req_s']:.1f} -> {new['req_s']:.1f} req/s, builds "
               f"{old['builds_s']:.1f} -> {new['builds_s']:.1f} /s.")
    lines = ["# Tier builds under a concurrent request", "", mach, "", about, "", *table(summary), "", verdict, "",
             "Per round:", "", *table(rows), "",
             f"Command: `python benchmarks/bench_tier_builds.py {' '.join(sys.argv[1:])}`"]
    print("\n" + "\n".join(lines))
    if args.write:
        DOCS.mkdir(parents=True, exist_ok=True)
        (DOCS / "bench_tier_builds.md").write_text("\n".join(lines) + "\n")
        with open(DOCS / "bench_tier_builds.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(summary[0]))
            w.writeheader()
            w.writerows(summary + rows)
        print(f"wrote {DOCS / 'bench_tier_builds.md'} and .csv")


if __name__ == "__main__":
    main()
