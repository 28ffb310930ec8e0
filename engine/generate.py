"""Static-batch generation: the simple path behind `sparsedial generate` and the runtime tests.

All prompts are prefilled in one forward (right-padded, per-row positions), then decoded together, each
row at its own position in its own KV-cache slot. The continuous-batching engine builds on the same
model calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from .model import Transformer
from .sampling import SamplingParams, select_token

FinishReason = Literal["stop", "length"]


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
             params: SamplingParams | list[SamplingParams]) -> list[Completion]:
    """Generate a completion for each prompt (text or token ids); one SamplingParams or one per prompt."""
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
    logits = model(tokens, positions, slots, logit_index=lens - 1)  # [B, V]
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
        logits = model(step, pos[:, None], slots, logit_index=torch.zeros(B, dtype=torch.long, device=device))
        pos += 1
    for c, p in zip(out, per_row):
        c.text = tokenizer.decode(c.tokens)
        cut = _stop_index(c.text, p.stop) if p.stop else None
        if cut is not None:
            c.text = c.text[:cut]
    return out
