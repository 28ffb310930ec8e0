"""How fast does the engine serve a 1B Llama-shaped model on a GPU, per tier, batch and backend?

Builds (in --work, reused when its shape matches, else a temporary folder) a Llama-shaped model with
random weights, by default TinyLlama-1.1B's shape (hidden 2048, intermediate 5632, 22 layers, 32 heads,
4 KV heads, vocab 32000: 1.10B parameters), saved as bf16 safetensors with the tokenizer of
`models/stdlib-tiny` (6144 tokens: prompts are random ids below 6144, generated ids above it decode to empty
text, which no number here reads), and a SYNTHETIC elastic checkpoint beside it (masks from |W| with random
jitter, random LoRA merged into the tiers: the format of a compressed model, not its quality). Then:

* decode tokens/s of `EngineCore` per backend (torch: merged masked weights through F.linear; triton: packed
  bitmap / 2:4 Triton kernels; the dense tier is F.linear in both) and tier, at batch 1, 8 and 32: B prompts
  of 16 random tokens, greedy, exactly N new tokens (ignore_eos), warm-up first, CUDA synchronized around
  each run, best of reps; decode = B (N - 1) tokens over the wall time after the last first token;
* time to first token of one 512-token prompt (engine defaults: prefill in chunks of 256), best of reps;
* memory each resident tier holds beyond the base weights (`ElasticModel.tier_bytes`), and peak GPU memory;
* transformers `generate()` on the same weights and prompts (the dense reference): decode = generate of N
  tokens minus generate of 1, TTFT = generate of 1 token on the 512-token prompt.

A failing cell (a Triton error, out of memory) is written into the table; once --budget-s (counted from the
start, the checkpoint build included) is spent no new measurement starts and the cells left say so. Writes <out>/bench_engine_gpu.md and .csv after every backend
(--out, default docs/ on CUDA) and, on CUDA only, the "engine-gpu" section of docs/benchmarks.md.
Usage:
    python benchmarks/bench_engine_gpu.py [--quick] [--work DIR] [--out DIR] [--budget-s 450] [--no-write]
    python benchmarks/bench_engine_gpu.py --smoke     # CPU, tiny shapes, 2 new tokens: proves the code path
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import DOCS, machine, write_section
from sparsedial.engine.config import ModelConfig
from sparsedial.engine.elastic import ElasticModel
from sparsedial.engine.elastic_format import (
    LINEAR_NAMES,
    ElasticSpec,
    LoraGroup,
    TierSpec,
    groups_for_nm,
    groups_for_sparsity,
    write_elastic,
)
from sparsedial.engine.model import Transformer
from sparsedial.engine.runner import EngineConfig, EngineCore
from sparsedial.engine.sampling import SamplingParams

from sparsedial.testing import synthetic_linear_maps

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "models" / "stdlib-tiny"
TOKENIZER_VOCAB = 6144  # ids of models/stdlib-tiny's tokenizer; prompts stay below it
CHECKPOINT_TIERS = (("dense", 0.0), ("30%", 0.3), ("50%", 0.5), ("70%", 0.7), ("90%", 0.9), ("2:4", 0.5))
SKIPPED = "skipped (budget)"
Cell = float | str  # a measurement, or why there is none


@dataclass(frozen=True)
class Shape:
    """A Llama decoder's sizes (HF config names in `hf_config`)."""

    hidden: int = 2048
    intermediate: int = 5632
    layers: int = 22
    heads: int = 32
    kv_heads: int = 4
    vocab: int = 32000
    max_positions: int = 2048

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF tensor names -> shapes (untied LM head, as TinyLlama), from the runtime's own decoder on meta."""
        with torch.device("meta"):
            model = Transformer(ModelConfig.from_hf(self.hf_config()))
        return {n: tuple(p.shape) for n, p in model.named_parameters()}

    @property
    def params(self) -> int:
        return sum(torch.Size(s).numel() for s in self.tensor_shapes().values())

    def hf_config(self) -> dict:
        rope = {"rope_theta": 10000.0, "rope_type": "default"}
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
                "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 0, "head_dim": self.head_dim,
                "hidden_act": "silu", "hidden_size": self.hidden, "initializer_range": 0.02,
                "intermediate_size": self.intermediate, "max_position_embeddings": self.max_positions,
                "mlp_bias": False, "num_attention_heads": self.heads, "num_hidden_layers": self.layers,
                "num_key_value_heads": self.kv_heads, "pretraining_tp": 1, "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0, "rope_parameters": rope, "tie_word_embeddings": False,
                "torch_dtype": "bfloat16", "dtype": "bfloat16", "use_cache": True, "vocab_size": self.vocab}


SMOKE_SHAPE = Shape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=TOKENIZER_VOCAB,
                    max_positions=1024)


# ------------------------------------------------------------------------------------------ checkpoint
def build_checkpoint(work: Path, shape: Shape, seed: int, device: torch.device) -> Path:
    """Random bf16 base + synthetic elastic checkpoint in `work` (reused when its marker matches)."""
    marker = {"shape": asdict(shape), "seed": seed, "tiers": [t for t, _ in CHECKPOINT_TIERS], "version": 1}
    stamp = work / "bench_engine_gpu.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == marker and (work / "elastic.json").is_file():
        print(f"reusing the checkpoint in {work}")
        return work
    if work.exists() and any(work.iterdir()):
        if not stamp.is_file():
            raise ValueError(f"--work {work} is not empty and was not made by this script: not overwriting")
        shutil.rmtree(work)  # made here for another shape or seed
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    state = write_base(work, shape, seed, device)
    write_synthetic_tiers(work, shape, state, seed, device)
    stamp.write_text(json.dumps(marker))
    print(f"checkpoint built in {time.perf_counter() - t0:.0f} s: {work}")
    return work


def write_base(work: Path, shape: Shape, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """config.json, the tokenizer of models/stdlib-tiny, random bf16 weights (std 0.02, norms 1)."""
    (work / "config.json").write_text(json.dumps(shape.hf_config(), indent=2))
    (work / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 0}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, work / name)
    g = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, s in tqdm(shape.tensor_shapes().items(), desc=f"random weights ({shape.params / 1e9:.2f}B)"):
        if len(s) == 1:
            state[name] = torch.ones(s, dtype=torch.bfloat16)
        else:
            state[name] = (torch.randn(s, generator=g, device=device) * 0.02).to(torch.bfloat16).cpu()
    t0 = time.perf_counter()
    save_file(state, work / "model.safetensors")
    print(f"wrote model.safetensors ({(work / 'model.safetensors').stat().st_size / 2**30:.2f} GiB) "
          f"in {time.perf_counter() - t0:.1f} s")
    return state


def write_synthetic_tiers(work: Path, shape: Shape, state: dict[str, torch.Tensor], seed: int,
                          device: torch.device, lora_rank: int = 8, lora_std: float = 0.02) -> None:
    """elastic.safetensors + elastic.json: elastic.synthetic_linear_maps per linear, computed on `device`."""
    groups = [LoraGroup(0, 0.0, 0.5, lora_rank), LoraGroup(1, 0.5, 0.7, lora_rank),
              LoraGroup(2, 0.7, 0.9, lora_rank), LoraGroup(3, 0.5, 0.5, lora_rank, nm=True)]
    tiers = [TierSpec("2:4", "nm", s, lora_groups=groups_for_nm(groups, s), n=2, m=4) if name == "2:4" else
             TierSpec(name, "dense" if s == 0 else "unstructured", s,
                      lora_groups=groups_for_sparsity(groups, s))
             for name, s in CHECKPOINT_TIERS]
    linears = [f"model.layers.{i}.{n}" for i in range(shape.layers) for n in LINEAR_NAMES]
    g = torch.Generator(device=device).manual_seed(seed + 1)
    tensors: dict[str, torch.Tensor] = {}
    for i, name in enumerate(tqdm(linears, desc="synthetic elastic maps")):
        maps = synthetic_linear_maps(name, state[f"{name}.weight"].to(device), groups, g, lora_std=lora_std,
                                     lora0_off=i % 3 == 0)  # some blocks opt out of LoRA_0
        tensors |= {k: v.cpu() for k, v in maps.items()}
    spec = ElasticSpec(tiers=tiers, groups=groups, linears=linears, importance="random", method="synthetic",
                       base_model="random Llama-shaped weights (benchmarks/bench_engine_gpu.py)")
    t0 = time.perf_counter()
    write_elastic(work, spec, tensors)
    print(f"wrote elastic.safetensors + elastic.json (with sha256s) in {time.perf_counter() - t0:.1f} s")


# ------------------------------------------------------------------------------------------ measuring
@dataclass
class Budget:
    """Wall-clock deadline: no measurement starts after it."""

    deadline: float

    @classmethod
    def of(cls, seconds: float) -> Budget:
        return cls(time.monotonic() + seconds)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def share(self, parts: int) -> Budget:
        """A deadline for the next of `parts` equal pieces of what is left."""
        return Budget(time.monotonic() + max(0.0, self.left()) / max(1, parts))


def measure(fn, budget: Budget) -> Cell:
    """fn()'s number, SKIPPED past the deadline, or the error it raised (one cell, never the whole run)."""
    if budget.left() <= 0:
        return SKIPPED
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a failing kernel or OOM is a result of this benchmark
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_rate(tokens: int, seconds: float) -> float:
    if seconds <= 0:
        raise ValueError(f"{tokens} decode tokens in {seconds * 1e3:.2f} ms: noise, use more --new-tokens")
    return tokens / seconds


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (n, length), generator=g).tolist()  # 0 is <|endoftext|>


def run_engine(core: EngineCore, prompts: list[list[int]], new: int, tier: str) -> tuple[float, float, list]:
    """(wall s, last first-token s, generations) of one greedy run; raises a request's error."""
    device = core.runner.device
    sync(device)
    start = time.perf_counter()
    gens = core.generate(prompts, SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True), tier)
    sync(device)
    wall = time.perf_counter() - start
    for g in gens:
        if g.finish.finish_reason == "error" or g.finish.completion_tokens != new:
            raise RuntimeError(g.finish.error or f"{g.finish.completion_tokens} of {new} tokens")
    return wall, max(g.finish.timings.ttft for g in gens), gens


def engine_config(em: ElasticModel, batch: int, seq_len: int, plan: Plan) -> EngineConfig:
    """Engine defaults, except the slots, context and (when batch prompts need it) the step budget."""
    return EngineConfig(model=em.lm.path, max_batch=batch, max_seq_len=seq_len,
                        max_step_tokens=max(1024, batch * plan.prompt_len))


def engine_decode(core: EngineCore, tier: str, prompts: list[list[int]], new: int, reps: int,
                  tokens_out: dict | None = None, key: object = "engine") -> float:
    """Best-of-reps decode tokens/s: B (new - 1) tokens after the last first token. `tokens_out[key]`: the
    first request's greedy tokens."""
    run_engine(core, prompts, 2, tier)  # warm-up (and Triton autotuning)
    best = 0.0
    for _ in range(reps):
        wall, first, gens = run_engine(core, prompts, new, tier)
        best = max(best, decode_rate(len(prompts) * (new - 1), wall - first))
    if tokens_out is not None:
        tokens_out[key] = gens[0].token_ids
    return best


def engine_ttft(core: EngineCore, tier: str, prompt: list[int], reps: int) -> float:
    """Best-of-reps time to first token (ms) of one long prompt."""
    run_engine(core, [prompt], 1, tier)  # warm-up
    return min(run_engine(core, [prompt], 1, tier)[1] for _ in range(reps)) * 1e3


# ------------------------------------------------------------------------------------------ the runs
@dataclass
class Results:
    """Every cell of the table: rows (engine, tier), columns 'batch B', 'ttft ms', 'tier MiB'."""

    cells: dict[tuple[str, str], dict[str, Cell]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def put(self, row: tuple[str, str], col: str, value: Cell) -> None:
        self.cells.setdefault(row, {})[col] = value


@dataclass(frozen=True)
class Plan:
    """What one run measures."""

    device: torch.device
    dtype: torch.dtype
    backends: tuple[str, ...]
    tiers: tuple[str, ...]
    batches: tuple[int, ...]
    new: int
    reps: int
    prompt_vocab: int = TOKENIZER_VOCAB  # prompt ids are drawn below this
    prompt_len: int = 16
    ttft_len: int = 512


def bench_backend(path: Path, backend: str, plan: Plan, res: Results, budget: Budget, tokens: dict) -> None:
    """Load with `backend`, make each tier resident (errors per tier), then decode and TTFT cells."""
    if plan.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(plan.device)
    t0 = time.perf_counter()
    if budget.left() <= 0:
        for tier in plan.tiers:
            res.put((backend, tier), "tier MiB", SKIPPED)
        return
    try:
        em = ElasticModel.load(path, dtype=plan.dtype, device=plan.device, backend=backend,
                               resident=["dense"])
    except Exception as e:  # noqa: BLE001 - reported in every cell of this backend
        for tier in plan.tiers:
            res.put((backend, tier), "tier MiB", f"error: {type(e).__name__}: {e}"[:160])
        return
    bad = {}
    for tier in plan.tiers:
        got = measure(lambda t=tier: em.add_resident(t) or em.tier_bytes[t] / 2**20, budget)
        res.put((backend, tier), "tier MiB", got)
        if isinstance(got, str):
            bad[tier] = SKIPPED if got == SKIPPED else "not run (tier failed to load)"
    base_mib = sum(p.numel() * p.element_size() for p in em.model.parameters()) / 2**20
    res.notes.append(f"{backend}: load + materialize {time.perf_counter() - t0:.1f} s; base weights "
                     f"{base_mib:.0f} MiB.")
    for b in plan.batches:  # batch-major: a budget cut keeps every tier's small batches
        prompts = random_prompts(b, plan.prompt_len, plan.prompt_vocab, seed=b)
        cfg = engine_config(em, b, plan.prompt_len + plan.new, plan)
        core = measure(lambda c=cfg: EngineCore(em, c), budget)
        for tier in plan.tiers:
            out = tokens if b == 1 else None  # batch 1: greedy tokens per (backend, tier), compared below
            cell = core if isinstance(core, str) else bad.get(tier) or measure(
                lambda c=core, t=tier, p=prompts, o=out, k=(backend, tier):
                engine_decode(c, t, p, plan.new, plan.reps, o, k), budget)
            res.put((backend, tier), f"batch {b}", cell)
    long_prompt = random_prompts(1, plan.ttft_len, plan.prompt_vocab, seed=512)[0]
    core = measure(lambda: EngineCore(em, engine_config(em, 1, plan.ttft_len + 2, plan)), budget)
    for tier in plan.tiers:
        res.put((backend, tier), "ttft ms", core if isinstance(core, str) else bad.get(tier) or measure(
            lambda c=core, t=tier: engine_ttft(c, t, long_prompt, plan.reps), budget))
    if plan.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(plan.device) / 2**30
        res.notes.append(f"{backend}: peak GPU memory {peak:.2f} GiB (weights, resident tiers, KV cache, "
                         "activations).")


def bench_transformers(path: Path, plan: Plan, res: Results, budget: Budget, tokens: dict) -> None:
    """transformers generate() on the same weights: decode tok/s per batch and TTFT (the dense reference)."""
    row = ("transformers generate()", "dense")
    try:
        import transformers
        from transformers import AutoModelForCausalLM

        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
        kw = {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": plan.dtype}
        hf = AutoModelForCausalLM.from_pretrained(path, **kw).to(device=plan.device, dtype=plan.dtype).eval()
    except Exception as e:  # noqa: BLE001 - no reference is a result too
        res.put(row, "batch 1", f"error: {type(e).__name__}: {e}"[:160])
        return

    def gen(prompts: list[list[int]], n: int) -> tuple[float, torch.Tensor]:
        ids = torch.tensor(prompts, device=plan.device)
        sync(plan.device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=0)
        sync(plan.device)
        return time.perf_counter() - start, out[:, ids.shape[1]:]

    def decode(prompts: list[list[int]]) -> float:
        gen(prompts, 2)  # warm-up
        one = min(gen(prompts, 1)[0] for _ in range(plan.reps))
        runs = [gen(prompts, plan.new) for _ in range(plan.reps)]
        if len(prompts) == 1:
            tokens["transformers"] = runs[-1][1][0].tolist()
        return decode_rate(len(prompts) * (plan.new - 1), min(t for t, _ in runs) - one)

    for b in plan.batches:
        prompts = random_prompts(b, plan.prompt_len, plan.prompt_vocab, seed=b)
        res.put(row, f"batch {b}", measure(lambda p=prompts: decode(p), budget))

    def ttft(prompts: list[list[int]]) -> float:
        gen(prompts, 1)  # warm-up
        return min(gen(prompts, 1)[0] for _ in range(plan.reps)) * 1e3

    long_prompt = random_prompts(1, plan.ttft_len, plan.prompt_vocab, seed=512)
    res.put(row, "ttft ms", measure(lambda: ttft(long_prompt), budget))


# ------------------------------------------------------------------------------------------ report
def fmt(value: Cell, ref: Cell | None = None) -> str:
    """A number (with its ratio to `ref`), or the cell's reason, made safe for a markdown table."""
    if isinstance(value, str):
        return value.replace("|", "/").replace("\n", " ")
    text = f"{value:.1f}" if value < 100 else f"{value:.0f}"
    if isinstance(ref, float) and ref > 0:
        text += f" ({value / ref:.2f}x)"
    return text


def table(res: Results, plan: Plan) -> list[str]:
    """Markdown table; decode ratios are against sparsedial's torch dense at the same batch."""
    cols = [f"batch {b}" for b in plan.batches]
    lines = ["| engine / tier | " + " | ".join(f"{c} decode tok/s" for c in cols)
             + f" | TTFT {plan.ttft_len} tok (ms) | tier memory (MiB) |", "|" + "---|" * (len(cols) + 3)]
    ref = res.cells.get(("torch", "dense"), {})
    for (engine, tier), row in res.cells.items():
        ratio = engine in ("torch", "triton") and (engine, tier) != ("torch", "dense")
        cells = [fmt(row.get(c, "-"), ref.get(c) if ratio else None) for c in cols]
        cells += [fmt(row.get("ttft ms", "-")), fmt(row.get("tier MiB", "-"))]
        lines.append(f"| {engine} {tier} | " + " | ".join(cells) + " |")
    return lines


def report(res: Results, plan: Plan, shape: Shape, tokens: dict) -> str:
    dt = str(plan.dtype).removeprefix("torch.")
    model = (f"Model: random Llama-shaped weights, {shape.params / 1e9:.2f}B parameters "
             f"(hidden {shape.hidden}, intermediate {shape.intermediate}, {shape.layers} layers, "
             f"{shape.heads} heads, {shape.kv_heads} KV heads, vocab {shape.vocab}; tokenizer of "
             f"`models/stdlib-tiny`, prompts are random ids < {TOKENIZER_VOCAB}), {dt}, with a SYNTHETIC "
             "elastic checkpoint (masks from |W| with random jitter, random LoRA merged: valid format, not a "
             "compressed model).")
    how = (f"Greedy, {plan.new} new tokens per request (ignore_eos), {plan.prompt_len}-token prompts, "
           f"best of {plan.reps} after a warm-up; decode tok/s = B x {plan.new - 1} tokens over the time "
           "after the last first token; ratios against sparsedial torch dense at the same batch. Tier "
           "memory: bytes a resident tier holds beyond the base weights.")
    lines = [f"Machine: {machine()}", model, how, ""]
    lines += table(res, plan) + [""]
    def agree(a: list[int], b: list[int]) -> int:
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    if ("torch", "dense") in tokens and "transformers" in tokens:
        a = tokens["torch", "dense"]
        lines.append(f"- Dense greedy tokens at batch 1, sparsedial torch vs transformers: the first "
                     f"{agree(a, tokens['transformers'])} of {len(a)} agree ({dt} random weights: near-ties "
                     "may flip later tokens).")
    both = [t for t in plan.tiers if ("torch", t) in tokens and ("triton", t) in tokens]
    if both:  # the triton backend's correctness at this scale: its greedy tokens against the torch backend's
        lines.append("- Greedy tokens at batch 1, triton vs torch backend, leading tokens that agree: " + ", ".join(
            f"{t} {agree(tokens['triton', t], tokens['torch', t])}/{len(tokens['torch', t])}" for t in both) + ".")
    ours, hf = res.cells.get(("torch", "dense"), {}), res.cells.get(("transformers generate()", "dense"), {})
    pairs = [(c, ours.get(c), hf.get(c)) for c in [f"batch {b}" for b in plan.batches] + ["ttft ms"]]
    ratios = [f"{c} {x / y:.2f}x" for c, x, y in pairs
              if isinstance(x, float) and isinstance(y, float) and y > 0]
    if ratios:
        lines.append("- sparsedial torch dense / transformers generate() (decode tok/s; TTFT ms): "
                     + ", ".join(ratios) + ".")
    lines += [f"- {n}" for n in res.notes]
    return "\n".join(lines) + "\n"


def write_outputs(res: Results, text: str, out: Path | None) -> None:
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_engine_gpu.md").write_text("# Engine on a GPU\n\n" + text)
    with open(out / "bench_engine_gpu.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["engine", "tier", "metric", "value"])
        for (engine, tier), row in res.cells.items():
            w.writerows([engine, tier, col, v] for col, v in row.items())


# ------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    d = Shape()
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, torch, 2 new tokens, no docs")
    ap.add_argument("--quick", action="store_true", help="tiers dense,50%%,2:4; batches 1,8; 32 new tokens")
    ap.add_argument("--work", type=Path, default=None, help="checkpoint folder, reused (default: temp)")
    ap.add_argument("--out", type=Path, default=None, help=".md/.csv folder (default: docs/ on CUDA)")
    ap.add_argument("--no-write", action="store_true", help="leave docs/benchmarks.md alone")
    ap.add_argument("--budget-s", type=float, default=450.0, help="no measurement starts after this")
    ap.add_argument("--backends", default=None, help="comma list of torch,triton (default: both on CUDA)")
    ap.add_argument("--tiers", default=None, help="comma list (default dense,50%%,70%%,90%%,2:4)")
    ap.add_argument("--batches", default=None, help="comma list (default 1,8,32)")
    ap.add_argument("--new-tokens", type=int, default=None, help="new tokens per request (default 64)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions, best kept (default 2)")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers generate() reference")
    ap.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16",
                    help="dtype on CUDA (the engine's auto dtype is bfloat16); CPU runs float32")
    ap.add_argument("--seed", type=int, default=0)
    for name, value in asdict(d).items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                        help=f"model shape (default {value})")
    return ap.parse_args(argv)


def make_plan(args: argparse.Namespace) -> tuple[Plan, Shape]:
    cuda = torch.cuda.is_available() and not args.smoke
    shape = replace(SMOKE_SHAPE if args.smoke else Shape(),
                    **{k: v for k, v in vars(args).items() if k in asdict(Shape()) and v is not None})
    tiers = "dense,50%,2:4" if args.quick else "dense,50%,70%,90%,2:4"
    batches = args.batches or ("1,8" if args.quick else "1,8,32")
    plan = Plan(device=torch.device("cuda" if cuda else "cpu"),
                dtype=getattr(torch, args.dtype) if cuda else torch.float32,
                backends=tuple((args.backends or ("torch,triton" if cuda else "torch")).split(",")),
                tiers=tuple((args.tiers or tiers).split(",")),
                batches=tuple(int(b) for b in batches.split(",")),
                new=args.new_tokens or (2 if args.smoke else 32 if args.quick else 64),
                reps=args.reps or (1 if args.smoke or args.quick else 2),
                prompt_vocab=min(shape.vocab, TOKENIZER_VOCAB), ttft_len=32 if args.smoke else 512)
    if plan.new < 2:
        raise ValueError(f"--new-tokens must be >= 2 (decode excludes the first token), got {plan.new}")
    unknown = [t for t in plan.tiers if t not in dict(CHECKPOINT_TIERS)]
    if unknown:
        raise ValueError(f"tiers {unknown} are not in the checkpoint ({', '.join(dict(CHECKPOINT_TIERS))})")
    return plan, shape


def main(argv: list[str] | None = None) -> tuple[Results, str]:
    args = parse_args(argv)
    plan, shape = make_plan(args)
    budget = Budget.of(args.budget_s)
    out = args.out or (DOCS if plan.device.type == "cuda" and not args.smoke else None)
    print(f"Machine: {machine()}\nplan: {plan}\nshape: {shape} ({shape.params / 1e9:.3f}B parameters)")
    res, tokens = Results(), {}
    with tempfile.TemporaryDirectory() as tmp:
        path = build_checkpoint(args.work or Path(tmp) / "model", shape, args.seed, plan.device)
        steps = ([] if args.no_hf else ["hf"]) + list(plan.backends)
        for i, step in enumerate(steps):
            share = budget.share(len(steps) - i)
            t0 = time.perf_counter()
            if step == "hf":
                bench_transformers(path, plan, res, share, tokens)
            else:
                bench_backend(path, step, plan, res, share, tokens)
            gc.collect()  # the step's model is unreachable now: free its memory before the next one loads
            if plan.device.type == "cuda":
                torch.cuda.empty_cache()
            print(f"{step}: {time.perf_counter() - t0:.0f} s, {budget.left():.0f} s of the budget left")
            write_outputs(res, report(res, plan, shape, tokens), out)  # partial results survive a kill
    text = report(res, plan, shape, tokens)
    print("\n" + text)
    if plan.device.type == "cuda" and not args.no_write:
        doc = DOCS / "benchmarks.md"
        if "<!-- BEGIN engine-gpu -->" not in doc.read_text():  # first run: the section gets its heading
            doc.write_text(doc.read_text().rstrip() + "\n\n## Engine (GPU)\n")
        write_section(doc, "engine-gpu", text, title="Benchmarks")
        print(f"wrote the 'engine-gpu' section of {DOCS / 'benchmarks.md'}")
    return res, text


if __name__ == "__main__":
    main()
