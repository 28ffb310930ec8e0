"""Test and benchmark helpers (not serving code): synthetic elastic checkpoints and a static-batch decoder.

- `write_synthetic_elastic`: a random-but-valid elastic checkpoint next to a copy of a base model (random
  scores -> ranks -> drop levels, random 2:4 masks, random LoRA groups). Not a compressed model: it gives
  tests and benchmarks every tier kind and LoRA path on any base model in seconds.
- `generate`: static-batch generation over the decoder alone (all prompts prefilled in one right-padded
  forward, then decoded together, each row at its own position in its own KV-cache slot). The engine's
  continuous batching must produce the same greedy tokens; tests use it as that reference.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from sparsedial.engine.elastic_format import (
    LINEAR_NAMES,
    NEVER_DROPPED,
    ElasticSpec,
    LoraGroup,
    keep_count,
    pack_mask24,
    rank_from_scores,
    write_elastic,
)
from sparsedial.engine.loader import load_model
from sparsedial.engine.model import Transformer
from sparsedial.engine.sampling import SamplingParams, select_token
from sparsedial.engine.tiers import TierPlan, TierSpec

FinishReason = Literal["stop", "length"]

DEFAULT_TIERS = (("dense", 0.0), ("30%", 0.3), ("40%", 0.4), ("50%", 0.5), ("60%", 0.6), ("70%", 0.7))


def fast_drop_levels(rank: torch.Tensor) -> torch.Tensor:
    """elastic_format.drop_levels_from_rank without its [out, in, 100] intermediate (same result)."""
    keeps = torch.tensor([keep_count(rank.shape[1], p / 100) for p in range(100, 0, -1)])  # ascending
    level = 101 - torch.searchsorted(keeps, rank.contiguous(), right=True)  # 1 + #percents with keep > r
    return torch.where(level > 100, NEVER_DROPPED, level).to(torch.uint8)


def synthetic_linear_maps(name: str, w: torch.Tensor, groups: list[LoraGroup], g: torch.Generator, *,
                          lora_std: float, with_24: bool = True, lora0_off: bool = False) -> dict[str, torch.Tensor]:
    """Random-but-valid elastic maps of one linear `name` with weight `w` [out, in], computed on w's device
    with generator `g` (same device): drop levels from |W| x U(0.5, 1.5), the top-2-of-4 2:4 mask of the same
    scores, random LoRA factors per group, the LoRA_0 flag. Not a pruning method: tests and benchmarks only."""
    out_f, in_f = w.shape
    scores = w.float().abs() * (0.5 + torch.rand(out_f, in_f, generator=g, device=w.device))
    with torch.device(w.device):  # fast_drop_levels builds its percent table with torch.tensor
        maps = {f"{name}.drop_level": fast_drop_levels(rank_from_scores(scores))}
    if with_24:
        keep = scores.view(out_f, in_f // 4, 4).argsort(-1, descending=True).argsort(-1) < 2  # 2 of every 4
        maps[f"{name}.mask24"] = pack_mask24(keep.reshape(out_f, in_f))
    for grp in groups:
        maps[f"{name}.lora.{grp.index}.A"] = torch.randn(grp.rank, in_f, generator=g, device=w.device) * lora_std
        maps[f"{name}.lora.{grp.index}.B"] = torch.randn(out_f, grp.rank, generator=g, device=w.device) * lora_std
    maps[f"{name}.lora0_off"] = torch.tensor(lora0_off, dtype=torch.uint8)
    return maps


def write_synthetic_elastic(base_dir: str | Path, out_dir: str | Path, *, seed: int = 0, lora_rank: int = 4,
                            lora_mode: Literal["masked", "unmasked"] = "masked", lora_std: float = 0.05,
                            with_24: bool = True, sparser: tuple[float, ...] = ()) -> Path:
    """A random-but-valid elastic checkpoint next to a copy of `base_dir`: random scores -> ranks -> drop
    levels, random 2:4 masks, random LoRA groups. `sparser`: extra unstructured tiers above 70% (e.g. 0.9),
    which no LoRA group reaches. For tests and benchmarks only (not a compressed model)."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in base_dir.iterdir():
        if f.is_file() and f.name not in ("elastic.json", "elastic.safetensors"):
            shutil.copy(f, out_dir / f.name)
    lm = load_model(out_dir, dtype=torch.float32, with_tokenizer=False)
    groups = [LoraGroup(0, 0.0, 0.4, lora_rank), LoraGroup(1, 0.4, 0.7, lora_rank)]
    tiers = [TierSpec(n, "dense" if s == 0 else "unstructured", s,
                      lora_groups=() if s == 0 else ((0,) if s <= 0.4 else (0, 1))) for n, s in DEFAULT_TIERS]
    tiers += [TierSpec(f"{round(s * 100)}%", "unstructured", s) for s in sparser]
    if with_24:
        groups.append(LoraGroup(2, 0.5, 0.5, lora_rank, nm=True))
        tiers.append(TierSpec("2:4", "nm", 0.5, lora_groups=(2,), n=2, m=4))
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    linears = [f"model.layers.{i}.{n}" for i in range(lm.config.num_hidden_layers) for n in LINEAR_NAMES]
    weights = dict(lm.model.named_parameters())
    for i, name in enumerate(linears):
        tensors |= synthetic_linear_maps(name, weights[f"{name}.weight"], groups, g, lora_std=lora_std,
                                         with_24=with_24, lora0_off=i % 3 == 0)
    spec = ElasticSpec(tiers=tiers, groups=groups, linears=linears, lora_mode=lora_mode, importance="random",
                       method="synthetic", base_model=str(base_dir))
    write_elastic(out_dir, spec, tensors)
    return out_dir


# ------------------------------------------------------------------------ static-batch reference decoder
@dataclass
class Completion:
    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason = "length"


def _stop_index(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


@torch.inference_mode()
def generate(model: Transformer, tokenizer, prompts: list[str] | list[list[int]],
             params: SamplingParams | list[SamplingParams], plan: TierPlan | None = None) -> list[Completion]:
    """Generate a completion for each prompt (text or token ids); one SamplingParams or one per prompt.
    `plan`: the tier every row runs at (one segment; its tier materialized), None: the base weights."""
    if not prompts:
        return []
    per_row = params if isinstance(params, list) else [params] * len(prompts)
    if len(per_row) != len(prompts):
        raise ValueError(f"{len(per_row)} SamplingParams for {len(prompts)} prompts")
    ids = [tokenizer.encode(p, add_special_tokens=False) if isinstance(p, str) else list(p) for p in prompts]
    if any(not row for row in ids):
        raise ValueError("empty prompt: a prompt must have at least one token")
    cfg = model.config
    device = model.model.embed_tokens.weight.device
    max_new = max(p.max_tokens for p in per_row)
    max_len = max(len(r) for r in ids) + max_new
    if max_len > cfg.max_position_embeddings:
        raise ValueError(f"prompt + max_tokens = {max_len} tokens exceeds the model's context "
                         f"({cfg.max_position_embeddings})")
    B = len(ids)
    model.setup_cache(B, max_len)
    slots = torch.arange(B, device=device)
    eos = set(cfg.eos_token_ids)
    gens = [p.make_generator() for p in per_row]
    out = [Completion(prompt_tokens=row) for row in ids]
    done = [p.max_tokens == 0 for p in per_row]

    # prefill: right-padded [B, T] with each row's own positions; logits at each row's last prompt token
    lens = torch.tensor([len(r) for r in ids], device=device)
    T = int(lens.max())
    tokens = torch.zeros(B, T, dtype=torch.long, device=device)
    for i, row in enumerate(ids):
        tokens[i, : len(row)] = torch.tensor(row)
    positions = torch.arange(T, device=device).expand(B, T)
    logits = model(tokens, positions, slots, logit_index=lens - 1, plan=plan)  # [B, V]
    pos = lens.clone()  # next position of each row
    for _ in range(max_new):
        next_tokens = []
        for i in range(B):
            if done[i]:
                next_tokens.append(0)
                continue
            tok = select_token(logits[i], per_row[i], gens[i])
            next_tokens.append(tok)
            c, p = out[i], per_row[i]
            if (tok in eos and not p.ignore_eos) or tok in p.stop_token_ids:
                done[i], c.finish_reason = True, "stop"
                continue
            c.tokens.append(tok)
            if p.stop:
                text = tokenizer.decode(c.tokens)
                if _stop_index(text, p.stop) is not None:
                    done[i], c.finish_reason = True, "stop"
                    continue
            if len(c.tokens) >= p.max_tokens:
                done[i] = True
        if all(done):
            break
        step = torch.tensor(next_tokens, device=device)[:, None]  # [B, 1]
        logits = model(step, pos[:, None], slots, logit_index=torch.zeros(B, dtype=torch.long, device=device),
                       plan=plan)
        pos += 1
    for c, p in zip(out, per_row):
        c.text = tokenizer.decode(c.tokens)
        cut = _stop_index(c.text, p.stop) if p.stop else None
        if cut is not None:
            c.text = c.text[:cut]
    return out
