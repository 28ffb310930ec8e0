"""How fast is the serving engine per tier and batch size, against transformers' own generate()?

On the embedded model (the compressed `models/stdlib-tiny-elastic` when it exists, else a synthetic elastic
checkpoint built from `models/stdlib-tiny`: masks from |W| with random jitter and random LoRA, valid but
not a pruning method; the table says which), on this machine's CPU, in one run:

* tokens/s of `EngineCore` (continuous batching, torch backend) for batch 1, 8 and 32 per tier: B prompts,
  greedy, exactly N new tokens each (ignore_eos), wall time from submit to the last token;
* tokens/s of transformers `generate()` on the same base model and prompts (left-padded, greedy,
  exactly N new tokens, fp32): the dense reference (on CPU the torch backend runs every tier as a dense
  matmul with a masked weight, so that column is the speed of every tier's reference too);
* whether our dense greedy tokens equal transformers' at batch 1;
* tier-switch latency (`set_policy` between resident tiers), the time
  to materialize a non-resident tier on first use, and memory held per resident tier.

Writes the "engine" section of docs/benchmarks.md. Usage:
    python benchmarks/bench_engine.py [--quick] [--threads N] [--model DIR] [--no-write]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import DOCS, machine, write_section
from sparsedial.engine.api import PolicySpec
from sparsedial.engine.elastic import ElasticModel
from sparsedial.engine.runner import EngineConfig, EngineCore
from sparsedial.engine.sampling import SamplingParams

from sparsedial.testing import write_synthetic_elastic

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "models" / "stdlib-tiny"
ELASTIC = ROOT / "models" / "stdlib-tiny-elastic"
STARTS = ["def ", "import os\n\n", "class Parser(", "    for i in range(", "    return ", "# Copyright",
          "if __name__ == ", "    def __init__(self, ", "try:\n    ", "from collections import ", "@property\n",
          "    raise ValueError(", "with open(path) as f:", "async def ", "x = [", "lambda "]


def prompts(n: int) -> list[str]:
    """n distinct code prompts of a few tokens each."""
    return [STARTS[i % len(STARTS)] + ("" if i < len(STARTS) else f"v{i} = ") for i in range(n)]


def bench_engine(em: ElasticModel, tier: str, batch: int, new: int, reps: int) -> float:
    """Best-of-reps tokens/s of EngineCore for `batch` prompts at `tier`."""
    cfg = EngineConfig(model=em.lm.path, max_batch=batch, max_seq_len=64 + new, max_step_tokens=max(512, batch))
    core = EngineCore(em, cfg)
    p = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    core.generate(prompts(batch), SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True), tier)  # warm-up
    best = 0.0
    for _ in range(reps):
        start = time.perf_counter()
        gens = core.generate(prompts(batch), p, tier)
        elapsed = time.perf_counter() - start
        assert all(g.finish.completion_tokens == new for g in gens)
        best = max(best, batch * new / elapsed)
    return best


def bench_transformers(hf, tok, batch: int, new: int, reps: int) -> tuple[float, list[list[int]]]:
    """Best-of-reps tokens/s of transformers generate(), and its tokens."""
    enc = tok(prompts(batch), return_tensors="pt", padding=True, add_special_tokens=False)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.inference_mode():
        hf.generate(**enc, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id)
        best, out = 0.0, None
        for _ in range(reps):
            start = time.perf_counter()
            out = hf.generate(**enc, **kw)
            best = max(best, batch * new / (time.perf_counter() - start))
    width = enc["input_ids"].shape[1]
    return best, out[:, width:].tolist()


def workload(n: int) -> list[int]:
    """max_tokens of n requests, spread over 8..64 (a mixed-length serving load)."""
    return [8 + (i * 37) % 57 for i in range(n)]


def bench_workload(em: ElasticModel, hf, tok, n: int, slots: int) -> tuple[float, float]:
    """Useful tokens/s on n mixed-length requests: our engine with `slots` KV slots (continuous batching)
    against transformers generate() on static batches of `slots` (each batch runs to its longest request)."""
    lengths, ps = workload(n), prompts(n)
    core = EngineCore(em, EngineConfig(model=em.lm.path, max_batch=slots, max_seq_len=128))
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in lengths]
    start = time.perf_counter()
    core.generate(ps, params, "dense")
    ours = sum(lengths) / (time.perf_counter() - start)
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, n, slots):
            enc = tok(ps[i:i + slots], return_tensors="pt", padding=True, add_special_tokens=False)
            m = max(lengths[i:i + slots])
            hf.generate(**enc, max_new_tokens=m, min_new_tokens=m, do_sample=False, pad_token_id=tok.pad_token_id)
    return ours, sum(lengths) / (time.perf_counter() - start)


def switch_latency(em: ElasticModel, tiers: list[str], n: int = 2000) -> float:
    """Median microseconds of set_policy(default_tier=t) on an engine (the tier of the next auto requests)."""
    core = EngineCore(em, EngineConfig(model=em.lm.path, max_batch=1, max_seq_len=64))
    times_policy = []
    for i in range(n):
        t = tiers[i % len(tiers)]
        start = time.perf_counter()
        core.set_policy(PolicySpec(default_tier=t))
        times_policy.append(time.perf_counter() - start)
    return statistics.median(times_policy) * 1e6


def projection_floor_ms(em: ElasticModel, batch: int, reps: int = 10) -> float:
    """Best-of-reps milliseconds of one decode step's projections alone: every served dense linear and the
    LM head back to back on `batch` rows, no other op. No engine built on these matmuls can step faster."""
    import torch.nn.functional as F

    weights = [lin.tiers["dense"].weight for lin in em._linears] + [em.model.lm_head.weight]
    xs = {w.shape[1]: torch.randn(batch, w.shape[1], dtype=w.dtype) for w in weights}
    best = float("inf")
    with torch.inference_mode():
        for i in range(reps + 2):
            start = time.perf_counter()
            for w in weights:
                F.linear(xs[w.shape[1]], w)
            if i >= 2:
                best = min(best, time.perf_counter() - start)
    return best * 1e3


def load_model(args: argparse.Namespace, tmp: Path) -> tuple[Path, str]:
    if args.model is not None:
        return args.model, f"`{args.model}`"
    if (ELASTIC / "elastic.json").is_file():
        return ELASTIC, "`models/stdlib-tiny-elastic` (compressed)"
    path = write_synthetic_elastic(BASE, tmp / "stdlib-tiny-synthetic", seed=0)
    return path, ("SYNTHETIC elastic checkpoint from `models/stdlib-tiny` (masks from |W| with random jitter, "
                  "random LoRA: valid format, not a compressed model)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 tiers, 16 new tokens, one repetition")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for both engines (default 1: on a shared 2-core machine two threads "
                         "oversubscribe and the numbers become noise)")
    ap.add_argument("--model", type=Path, default=None, help="elastic checkpoint (default: see module doc)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    new, reps = (16, 1) if args.quick else (48, 2)
    with tempfile.TemporaryDirectory() as tmp:
        path, label = load_model(args, Path(tmp))
        lines = [f"Machine: {machine()}", f"Model: {label}.",
                 f"Greedy, {new} new tokens per request (ignore_eos), best of {reps}; CPU, torch backend; the "
                 "same prompts for both engines; ratios are against transformers at the same dtype.", ""]
        for dtype in (torch.float32, torch.bfloat16):
            lines += run(path, dtype, args.quick, [1, 8, 32], new, reps)
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(DOCS / "benchmarks.md", "engine", text, title="Benchmarks")
        print(f"\nwrote the 'engine' section of {DOCS / 'benchmarks.md'}")


def run(path: Path, dtype: torch.dtype, quick: bool, batches: list[int], new: int, reps: int) -> list[str]:
    """One dtype: the throughput table, token equality, switch latency, materialization time, memory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    em = ElasticModel.load(path, dtype=dtype)
    load_s = time.perf_counter() - t0
    tiers = ["dense", "50%", "2:4"] if quick else em.tiers
    # transformers reads the base model: the checkpoint itself, or where its spec's base_weights point
    base = path if (path / "model.safetensors").is_file() else (path / em.spec.base_weights).parent
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(base, padding_side="left")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    ref, ref_tokens = {}, None
    for b in batches:
        ref[b], toks = bench_transformers(hf, tok, b, new, reps)
        ref_tokens = toks if b == 1 else ref_tokens
    ours = {(t, b): bench_engine(em, t, b, new, reps) for t in tiers for b in batches}
    n_req = 16 if quick else 32
    wl_ours, wl_ref = bench_workload(em, hf, tok, n_req, 8)
    floor = {b: projection_floor_ms(em, b) for b in batches}
    core = EngineCore(em, EngineConfig(model=em.lm.path, max_batch=1, max_seq_len=64 + new))
    mine = core.generate(prompts(1), SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True), "dense")
    same = mine[0].token_ids == ref_tokens[0]
    pol_us = switch_latency(em, [t for t in tiers if t in em.resident])
    start = time.perf_counter()
    em.ensure([em.resolve(0.45).name])
    mat_ms = (time.perf_counter() - start) * 1e3
    base_mib = sum(p.numel() * p.element_size() for p in em.model.parameters()) / 2**20
    name = str(dtype).removeprefix("torch.")

    lines = [f"#### {name}", "", "| engine / tier | " + " | ".join(f"batch {b} tok/s" for b in batches) + " |",
             "|" + "---|" * (len(batches) + 1),
             "| transformers generate() (dense) | " + " | ".join(f"{ref[b]:.0f}" for b in batches) + " |"]
    for t in tiers:
        cells = [f"{ours[t, b]:.0f} ({ours[t, b] / ref[b]:.2f}x)" for b in batches]
        lines.append(f"| sparsedial {t} | " + " | ".join(cells) + " |")
    lines += ["", "- Projection floor (the served dense projections and LM head alone, back to back, hot cache): "
              + ", ".join(f"{floor[b]:.2f} ms per step at batch {b} (at most {b * 1e3 / floor[b]:.0f} tok/s, "
                          f"{b * 1e3 / floor[b] / ref[b]:.2f}x transformers)" for b in batches)
              + ". Every other op of a step (norms, RoPE, KV cache, attention, sampling) comes on top.",
              f"- Mixed-length load ({n_req} requests, max_tokens 8..64, dense, 8 KV slots vs static batches of "
              f"8): sparsedial {wl_ours:.0f} useful tok/s, transformers {wl_ref:.0f} ({wl_ours / wl_ref:.2f}x).",
              f"- Load with every tier resident: {load_s:.1f} s. Dense greedy tokens equal transformers' at "
              f"batch 1: {'yes' if same else 'NO'}.",
              f"- Tier switch between resident tiers: set_policy {pol_us:.1f} us (median of 2000; no reload).",
              f"- First use of a non-resident tier (45%, materialized from the drop levels): {mat_ms:.0f} ms.",
              f"- Memory per resident tier beyond the base weights ({base_mib:.1f} MiB): " + ", ".join(
                  f"{t} {em.tier_bytes[t] / 2**20:.1f} MiB" for t in em.tiers if t in em.tier_bytes) + ".", ""]
    return lines


if __name__ == "__main__":
    main()
