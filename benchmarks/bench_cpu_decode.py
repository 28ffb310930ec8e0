"""CPU decode: packed bf16 tier formats + C++ kernels (issue 12) vs the fp32 path, on a random 480M Llama.

One run, interleaved, best of --reps: batch 1 and 8 tok/s of `EngineCore.generate` (prompts of a few tokens,
--new greedy tokens: decode dominates) for the dense tier (fp32 path = fp32 MKL; new path = bf16 kernel),
50%, 70%, 90% and 2:4 on the new path and on the old (fp32) path, and transformers `generate()` on the
same weights. Also bytes read per token (weights each decode step streams / rows), the fraction of the
machine's measured GEMV bandwidth (fp32 x @ W.T, one row, matrices well beyond L3), resident MiB per tier
and load time of each path. Memory: the old path holds one fp32 tier copy at a time (built per tier, the
build is not timed); HF's model is freed after the dense round.

    .venv/bin/python benchmarks/bench_cpu_decode.py            # writes docs/benchmarks.md, "CPU kernels"
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import DOCS, machine, write_section
from bench_engine import bench_engine, bench_transformers
from sparsedial.engine.elastic import ElasticModel
from sparsedial.engine.linear import DENSE_BF16_MAX_ROWS, ElasticLinear, PackedHead
from sparsedial.kernels import _cpu_ext

from sparsedial.testing import write_synthetic_elastic

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_FROM = ROOT / "models" / "stdlib-tiny"
SHAPE = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 8, "num_attention_heads": 32,
         "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048}
TIERS = ["50%", "70%", "2:4"]  # the synthetic checkpoint (sparsedial.testing) drops up to 70%


def build_base(out: Path, seed: int = 0) -> Path:
    """A random-weight Llama (SHAPE, untied head) in HF format with the stdlib-tiny tokenizer."""
    if (out / "model.safetensors").is_file():
        return out
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    out.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(**SHAPE, tie_word_embeddings=False, rms_norm_eps=1e-5)
    cfg.save_pretrained(out)
    g = torch.Generator().manual_seed(seed)
    h, f, kv = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["num_key_value_heads"] * 64
    sd = {"model.embed_tokens.weight": torch.randn(SHAPE["vocab_size"], h, generator=g) * 0.02,
          "lm_head.weight": torch.randn(SHAPE["vocab_size"], h, generator=g) * 0.02,
          "model.norm.weight": torch.ones(h)}
    for i in range(SHAPE["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (kv, h)), ("self_attn.v_proj", (kv, h)),
                            ("self_attn.o_proj", (h, h)), ("mlp.gate_proj", (f, h)), ("mlp.up_proj", (f, h)),
                            ("mlp.down_proj", (h, f))):
            sd[p + name + ".weight"] = torch.randn(*shape, generator=g) / shape[1] ** 0.5
        sd[p + "input_layernorm.weight"] = torch.ones(h)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(h)
    save_file(sd, str(out / "model.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_FROM / name, out / name)
    return out


def gemv_bandwidth(reps: int = 5) -> float:
    """GB/s of fp32 x @ W.T at one row over 4 x [5632, 2048] matrices (184 MB, beyond L3), best of reps."""
    ws = [torch.randn(5632, 2048) for _ in range(4)]
    x = torch.randn(1, 2048)
    best = 1e9
    for _ in range(reps):
        t = time.perf_counter()
        for w in ws:
            F.linear(x, w)
        best = min(best, time.perf_counter() - t)
    return sum(w.numel() * 4 for w in ws) / best / 1e9


def step_bytes(em: ElasticModel, tier: str, rows: int) -> int:
    """Weight bytes one decode step of `rows` rows streams at `tier` (projections + LM head)."""
    total = 0
    for lin in em._linears:
        tw = lin.tiers[tier]
        if tw.cpu is not None and (tw.cpu_max_rows is None or rows <= tw.cpu_max_rows):
            total += tw.cpu.nbytes
        elif tw.csr is not None and rows >= tw.csr_min_rows:
            total += sum(t.numel() * t.element_size() for t in (tw.csr.values(), tw.csr.col_indices(),
                                                                tw.csr.crow_indices()))
        else:
            total += tw.weight.numel() * tw.weight.element_size()
        for t in (tw.lora_a, tw.lora_b):
            total += 0 if t is None else t.numel() * t.element_size()
    head = em.model.lm_head
    if isinstance(head, PackedHead) and rows <= DENSE_BF16_MAX_ROWS:
        return total + head.nbytes  # the bf16 copy the kernel reads at decode
    return total + head.weight.numel() * head.weight.element_size()


def load(path: Path, kernels: bool, resident: list[str]) -> tuple[ElasticModel, float]:
    t = time.perf_counter()
    em = ElasticModel.load(path, dtype="float32", resident=resident, cache_tiers=1, cpu_kernels=kernels)
    return em, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new", type=int, default=16, help="greedy tokens per prompt")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "sparsedial" / "bench-llama480m")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = build_base(args.work / "base")
    path = args.work / "elastic"
    if not (path / "elastic.json").is_file():
        write_synthetic_elastic(base, path, seed=0)
    gc.collect()
    print(machine(), "| ISA:", _cpu_ext.isa(), flush=True)
    bw = gemv_bandwidth()
    print(f"GEMV bandwidth {bw:.1f} GB/s", flush=True)

    new, t_new = load(path, True, ["dense", *TIERS])
    print(f"new path loaded in {t_new:.1f} s", flush=True)
    old, t_old = load(path, False, ["dense"])
    print(f"old path loaded (dense only) in {t_old:.1f} s", flush=True)
    dense_fp32 = sum(m.weight.numel() * 4 for m in old._linears if isinstance(m, ElasticLinear))

    # round 1: dense, three ways, interleaved rep by rep (each call is best of 1; best of reps kept)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(base)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = "left"
    best: dict[tuple[str, int], float] = {}
    old_build: dict[str, float] = {}
    for tier in ["dense", *TIERS]:
        if tier != "dense":
            t = time.perf_counter()
            old.ensure([tier])  # one fp32 tier copy at a time (cache_tiers=1 evicts the previous one)
            old_build[tier] = time.perf_counter() - t
        for _ in range(args.reps):
            for b in (1, 8):
                got = {"old": bench_engine(old, tier, b, args.new, 1), "new": bench_engine(new, tier, b, args.new, 1)}
                if tier == "dense" and hf is not None:
                    got["hf"] = bench_transformers(hf, tok, b, args.new, 1)[0]
                for who, v in got.items():
                    best[(who, tier, b)] = max(best.get((who, tier, b), 0.0), v)
        print(tier, {k: round(v, 2) for k, v in best.items() if k[1] == tier}, flush=True)
        if tier == "dense":
            del hf
            hf = None
            gc.collect()
        sb = {(p, b): step_bytes(em, tier, b) for p, em in (("old", old), ("new", new)) for b in (1, 8)}
        best[("bytes", tier, 0)] = sb  # type: ignore[assignment]
        best[("mib_old", tier, 0)] = old.tier_bytes[tier] / 2**20
        best[("mib_new", tier, 0)] = new.tier_bytes[tier] / 2**20

    base_b1 = best[("old", "dense", 1)]
    flags = ", ".join(sorted(f for f in _cpu_ext.cpu_flags() if f.startswith(("avx", "fma", "amx"))))
    params = sum(p.numel() for p in new.model.parameters()) / 1e6
    lines = [(f"Machine: {machine()}; CPU flags: {flags}; "
              f"kernel ISA path: {_cpu_ext.isa()}; {args.threads} thread(s); GEMV bandwidth (fp32, 1 row, 184 MB): "
              f"{bw:.1f} GB/s. Model: random Llama {params:.0f}M "
              f"(hidden 2048, 8 layers, ffn 5632, 32/4 heads, vocab 32000 untied), synthetic elastic checkpoint. "
              f"Best of {args.reps}, interleaved rep by rep within each tier's round; EngineCore.generate of "
              f"{args.new} greedy tokens after a few prompt tokens."),
             "",
             (f"Load: new path (dense + {', '.join(TIERS)} packed) {t_new:.0f} s; old path (dense only) "
              f"{t_old:.0f} s, + per fp32 tier build " + ", ".join(f"{k} {v:.0f} s" for k, v in old_build.items())
              + "."),
             "",
             ("| tier | path | b1 tok/s | b8 tok/s | b1 vs old dense | vs old same tier b1 / b8 | MB/token b1 | "
              "b1 bandwidth fraction | b8 bandwidth fraction | resident MiB |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    hf1, hf8 = best[("hf", "dense", 1)], best[("hf", "dense", 8)]
    lines.insert(4, f"transformers generate() fp32, same weights: b1 {hf1:.2f} tok/s, b8 {hf8:.2f} tok/s.")
    lines.insert(5, "")
    for tier in ["dense", *TIERS]:
        sb = best[("bytes", tier, 0)]
        for p in ("old", "new"):
            b1, b8 = best[(p, tier, 1)], best[(p, tier, 8)]
            o1, o8 = best[("old", tier, 1)], best[("old", tier, 8)]
            f1 = sb[(p, 1)] * b1 / 1e9 / bw
            f8 = sb[(p, 8)] * (b8 / 8) / 1e9 / bw
            mib = best[(f"mib_{p}", tier, 0)]
            label = {"old": "fp32 (old)", "new": "bf16 kernel (new)" if tier == "dense" else "packed (new)"}[p]
            lines.append(f"| {tier} | {label} | {b1:.2f} | {b8:.2f} | {b1 / base_b1:.2f}x | "
                         f"{b1 / o1:.2f}x / {b8 / o8:.2f}x | {sb[(p, 1)] / 1e6:.0f} | {f1:.2f} | {f8:.2f} | {mib:.0f} |")
    lines.append("")
    lines.append(f"Dense fp32 weights of the projections: {dense_fp32 / 2**20:.0f} MiB; resident MiB = bytes a tier "
                 f"holds beyond the base weights (dense: 0 on the old path, its bf16 copy on the new).")
    text = "\n".join(lines)
    print(text)
    (args.work / "result.json").write_text(json.dumps({str(k): v for k, v in best.items()
                                                        if not isinstance(v, dict)}, indent=1))
    if not args.no_write:
        write_section(DOCS / "benchmarks.md", "cpu-decode", text, "Benchmarks")


if __name__ == "__main__":
    main()
