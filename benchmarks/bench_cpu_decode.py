"""CPU decode: packed bf16 tier formats + C++ kernels (issue 12) vs the fp32 path, transformers and CTranslate2.

One run per model, best of --reps: batch 1 and 8 tok/s of `EngineCore.generate` (prompts of a few tokens,
--new greedy tokens: decode dominates). Round 1 interleaves, one measurement each per rep: the dense tier on
the old fp32 path (fp32 MKL), every tier of the new path (dense = bf16 kernel; 50%, 70%, 90%, 2:4 packed),
transformers `generate()` and CTranslate2 (float32 and int8, `pip install ctranslate2`; skipped with a note
when missing) on the same weights: every target ratio comes from it. Round 2 runs each sparse tier on the
old fp32 path (one fp32 tier copy at a time), for the old rows of the table. Models: (a) a random-weight Llama of 483M parameters built by the script (hidden 2048, 8
layers, ffn 5632, GQA 32/4, vocab 32000 untied), (b) SmolLM2-135M-Instruct when imported (`make smollm2`),
each with a synthetic elastic checkpoint (random masks: this measures speed, not quality). Also bytes read
per token (weights each decode step streams / rows), the fraction of the machine's measured GEMV bandwidth
(bf16 x @ W.T through the dense kernel, one row, matrices well beyond L3), resident MiB per tier and the
load time of each path. HF's and CTranslate2's models are freed after round 1.

    .venv/bin/python benchmarks/bench_cpu_decode.py --threads 2   # writes docs/benchmarks.md, "CPU decode"
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
from sparsedial.engine.linear import ElasticLinear, PackedHead
from sparsedial.kernels import _cpu_ext

from sparsedial.testing import write_synthetic_elastic

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_FROM = ROOT / "models" / "stdlib-tiny"
SHAPE = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 8, "num_attention_heads": 32,
         "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048}
TIERS = ["50%", "70%", "90%", "2:4"]


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
    """GB/s of one-row x @ W.T over 4 x [5632, 2048] matrices (beyond L3), best of reps: the larger of fp32
    MKL (184 MB) and the bf16 dense kernel (92 MB), i.e. the most this machine's GEMV reaches."""
    from sparsedial.kernels.cpu_dispatch import cpu_linear
    from sparsedial.kernels.cpu_formats import pack_dense_bf16

    ws = [torch.randn(5632, 2048) for _ in range(4)]
    packed = [pack_dense_bf16(w) for w in ws]
    x = torch.randn(1, 2048)
    best = {"fp32": 1e9, "bf16": 1e9}
    for _ in range(reps):
        for kind, mats, fn in (("fp32", ws, F.linear), ("bf16", packed, cpu_linear)):
            t = time.perf_counter()
            for w in mats:
                fn(x, w)
            best[kind] = min(best[kind], time.perf_counter() - t)
    return max(4 * 5632 * 2048 * 4 / best["fp32"], 4 * 5632 * 2048 * 2 / best["bf16"]) / 1e9


def step_bytes(em: ElasticModel, tier: str, rows: int) -> int:
    """Weight bytes one decode step of `rows` rows streams at `tier` (projections + LM head)."""
    total = 0
    for lin in em._linears:
        tw = lin.tiers[tier]
        if tw.cpu is not None and (tw.cpu_max_rows is None or rows <= tw.cpu_max_rows):
            total += tw.cpu.nbytes
        elif tw.cpu_wide is not None:
            total += tw.cpu_wide.nbytes
        elif tw.csr is not None and rows >= tw.csr_min_rows:
            total += sum(t.numel() * t.element_size() for t in (tw.csr.values(), tw.csr.col_indices(),
                                                                tw.csr.crow_indices()))
        else:
            total += tw.weight.numel() * tw.weight.element_size()
        for t in (tw.lora_a, tw.lora_b):
            total += 0 if t is None else t.numel() * t.element_size()
    head = em.model.lm_head
    if isinstance(head, PackedHead) and (head.tier.cpu_max_rows is None or rows <= head.tier.cpu_max_rows):
        return total + head.nbytes  # the bf16 copy the kernel reads at decode
    return total + head.weight.numel() * head.weight.element_size()


def load(path: Path, kernels: bool, resident: list[str]) -> tuple[ElasticModel, float]:
    t = time.perf_counter()
    em = ElasticModel.load(path, dtype="float32", resident=resident, cache_tiers=1, cpu_kernels=kernels)
    return em, time.perf_counter() - t


def ct2_models(base: Path, work: Path) -> dict[str, Path] | str:
    """CTranslate2 conversions of `base` (float32 and int8 weights), cached under `work`; or why not."""
    try:
        import ctranslate2
        from ctranslate2.converters import TransformersConverter
    except ImportError:
        return "CTranslate2 not installed (pip install ctranslate2): its columns are empty"
    out = {}
    for quant in ("float32", "int8"):
        d = work / f"ct2-{quant}"
        if not (d / "model.bin").is_file():
            TransformersConverter(str(base)).convert(str(d), quantization=quant, force=True)
        out[quant] = d
    print("CTranslate2", ctranslate2.__version__, flush=True)
    return out


def bench_ct2(gen, tok, batch: int, new: int) -> float:
    """tokens/s of one CTranslate2 greedy generate_batch of `batch` prompts, `new` tokens each."""
    from bench_engine import prompts

    toks = [tok.convert_ids_to_tokens(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts(batch)]
    kw = {"max_length": new, "min_length": new, "sampling_topk": 1, "include_prompt_in_result": False}
    gen.generate_batch(toks, **{**kw, "max_length": 2, "min_length": 2})  # warm-up
    start = time.perf_counter()
    res = gen.generate_batch(toks, **kw)
    elapsed = time.perf_counter() - start
    count = sum(len(r.sequences_ids[0]) for r in res)
    assert count == batch * new, count
    return count / elapsed


def bench_model(label: str, base: Path, path: Path, args, bw: float) -> list[str]:
    """The interleaved rounds of one model; the markdown lines of its table."""
    new, t_new = load(path, True, ["dense", *TIERS])
    print(f"{label}: new path loaded in {t_new:.1f} s", flush=True)
    old, t_old = load(path, False, ["dense"])
    print(f"{label}: old path loaded (dense only) in {t_old:.1f} s", flush=True)
    dense_fp32 = sum(m.weight.numel() * 4 for m in old._linears if isinstance(m, ElasticLinear))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(base)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = "left"
    ct2 = ct2_models(base, args.work / label) if not args.no_ct2 else "CTranslate2 skipped (--no-ct2)"
    gens = {}
    if isinstance(ct2, dict):
        import ctranslate2

        gens = {q: ctranslate2.Generator(str(d), device="cpu", compute_type=q, intra_threads=args.threads)
                for q, d in ct2.items()}
    best: dict[tuple[str, str, int], float] = {}
    extra: dict[tuple[str, str], object] = {}
    old_build: dict[str, float] = {}

    def keep(who: str, tier: str, b: int, v: float) -> None:
        best[(who, tier, b)] = max(best.get((who, tier, b), 0.0), v)

    # round 1, every ratio of the targets: the fp32 dense path, every tier of the new path, transformers and
    # CTranslate2, all resident at once, interleaved one measurement each per rep
    for _ in range(args.reps):
        for b in (1, 8):
            keep("old", "dense", b, bench_engine(old, "dense", b, args.new, 1))
            for tier in ["dense", *TIERS]:
                keep("new", tier, b, bench_engine(new, tier, b, args.new, 1))
            keep("hf", "dense", b, bench_transformers(hf, tok, b, args.new, 1)[0])
            for q, gen in gens.items():
                keep(f"ct2-{q}", "dense", b, bench_ct2(gen, tok, b, args.new))
        print(label, "round 1", {k: round(v, 2) for k, v in best.items()}, flush=True)
    del hf
    gens.clear()
    gc.collect()
    # round 2: each sparse tier on the fp32 path (one fp32 copy at a time: cache_tiers=1 evicts the last)
    for tier in ["dense", *TIERS]:
        if tier != "dense":
            t = time.perf_counter()
            old.ensure([tier])
            old_build[tier] = time.perf_counter() - t
            for _ in range(args.reps):
                for b in (1, 8):
                    keep("old", tier, b, bench_engine(old, tier, b, args.new, 1))
            print(label, "round 2", tier, {k: round(v, 2) for k, v in best.items() if k[1] == tier}, flush=True)
        extra[("bytes", tier)] = {(p, b): step_bytes(em, tier, b) for p, em in (("old", old), ("new", new))
                                  for b in (1, 8)}
        extra[("mib_old", tier)] = old.tier_bytes[tier] / 2**20
        extra[("mib_new", tier)] = new.tier_bytes[tier] / 2**20

    base_b1 = best[("old", "dense", 1)]
    params = sum(p.numel() for p in new.model.parameters()) / 1e6
    del old, new
    gc.collect()
    lines = [f"**{label}** ({params:.0f}M parameters). Load: new path (dense + {', '.join(TIERS)} packed) "
             f"{t_new:.0f} s; old path (dense only) {t_old:.0f} s, + per fp32 tier build "
             + ", ".join(f"{k} {v:.0f} s" for k, v in old_build.items()) + ".",
             ""]
    refs = [("transformers generate() fp32", "hf")]
    if isinstance(ct2, dict):
        refs += [("CTranslate2 float32", "ct2-float32"), ("CTranslate2 int8", "ct2-int8")]
    lines.append("Same weights, same prompts: " + "; ".join(
        f"{name} b1 {best[(k, 'dense', 1)]:.2f} / b8 {best[(k, 'dense', 8)]:.2f} tok/s" for name, k in refs)
        + ("" if isinstance(ct2, dict) else f" ({ct2})") + ".")
    lines += ["",
              ("| tier | path | b1 tok/s | b8 tok/s | b1 vs old dense | b1 vs CT2 fp32 / int8 | "
               "vs new dense b1 / b8 | MB/token b1 | b1 / b8 bandwidth fraction | resident MiB |"),
              "|---|---|---|---|---|---|---|---|---|---|"]
    for tier in ["dense", *TIERS]:
        sb = extra[("bytes", tier)]
        for p in ("old", "new"):
            b1, b8 = best[(p, tier, 1)], best[(p, tier, 8)]
            n1, n8 = best[("new", "dense", 1)], best[("new", "dense", 8)]
            f1 = sb[(p, 1)] * b1 / 1e9 / bw
            f8 = sb[(p, 8)] * (b8 / 8) / 1e9 / bw
            vs_ct2 = (f"{b1 / best[('ct2-float32', 'dense', 1)]:.2f}x / {b1 / best[('ct2-int8', 'dense', 1)]:.2f}x"
                      if isinstance(ct2, dict) else "-")
            mib = extra[(f"mib_{p}", tier)]
            name = {"old": "fp32 (old)", "new": "bf16 kernel (new)" if tier == "dense" else "packed (new)"}[p]
            lines.append(f"| {tier} | {name} | {b1:.2f} | {b8:.2f} | {b1 / base_b1:.2f}x | {vs_ct2} | "
                         f"{b1 / n1:.2f}x / {b8 / n8:.2f}x | {sb[(p, 1)] / 1e6:.0f} | {f1:.2f} / {f8:.2f} | {mib:.0f} |")
    lines += ["", (f"Dense fp32 weights of the projections: {dense_fp32 / 2**20:.0f} MiB; resident MiB = bytes a tier "
              f"holds beyond the base weights (dense: 0 on the old path, its bf16 copy on the new)."), ""]
    (args.work / f"result-{label}.json").write_text(json.dumps({str(k): v for k, v in best.items()}, indent=1))
    return lines


def synthetic(base: Path, out: Path) -> Path:
    """The synthetic elastic checkpoint of `base` with every tier of TIERS (rebuilt when one is missing)."""
    meta = out / "elastic.json"
    if meta.is_file() and all(f'"{t}"' in meta.read_text() for t in TIERS):
        return out
    return write_synthetic_elastic(base, out, seed=0, sparser=(0.9,))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new", type=int, default=16, help="greedy tokens per prompt")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "sparsedial" / "bench-llama480m")
    ap.add_argument("--smollm2", type=Path, default=ROOT / "models" / "smollm2-135m-instruct",
                    help="an imported SmolLM2 (make smollm2); skipped when absent")
    ap.add_argument("--only", choices=("llama480m", "smollm2"), help="one model only")
    ap.add_argument("--no-ct2", action="store_true", help="skip CTranslate2")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(machine(), "| ISA:", _cpu_ext.isa(), flush=True)
    bw = gemv_bandwidth()
    print(f"GEMV bandwidth {bw:.1f} GB/s", flush=True)
    models = []
    if args.only in (None, "llama480m"):
        base = build_base(args.work / "base")
        models.append(("llama480m", base, synthetic(base, args.work / "elastic")))
    if args.only in (None, "smollm2"):
        if (args.smollm2 / "model.safetensors").is_file():
            models.append(("smollm2", args.smollm2, synthetic(args.smollm2, args.work / "smollm2-elastic")))
        else:
            print(f"no SmolLM2 at {args.smollm2} (make smollm2): skipped", flush=True)
    gc.collect()
    flags = ", ".join(sorted(f for f in _cpu_ext.cpu_flags() if f.startswith(("avx", "fma", "amx"))))
    lines = [(f"Machine: {machine()}; CPU flags: {flags}; kernel ISA path: {_cpu_ext.isa()}; {args.threads} "
              f"thread(s); GEMV bandwidth (1 row, matrices beyond L3, best of fp32 MKL and the bf16 kernel): "
              f"{bw:.1f} GB/s. Best of {args.reps}; round 1 (every new-path tier, the fp32 dense, "
              f"transformers, CTranslate2) interleaved one measurement each per rep, round 2 (the fp32 path's "
              f"sparse tiers, rows 'fp32 (old)' below dense) tier by tier; "
              f"EngineCore.generate of {args.new} greedy tokens after a few prompt tokens; synthetic elastic "
              f"checkpoints (random masks)."), ""]
    for label, base, path in models:
        lines += bench_model(label, base, path, args, bw)
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section(DOCS / "benchmarks.md", "cpu-decode-run", text, "Benchmarks")


if __name__ == "__main__":
    main()
