"""Held-out perplexity: the quality number every tier and method in docs/quality.md is judged by.

Documents are tokenized without special tokens and joined with the end-of-text token (exactly as the
embedded model's training data), the stream is cut into non-overlapping windows of `seq_len + 1` tokens,
and the reported figure is exp(mean next-token NLL) over every predicted token, plus bits per byte.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from sparsedial import corpus


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean next-token negative log-likelihood (nats)
    tokens: int  # predicted tokens
    bytes: int  # UTF-8 bytes of the evaluated text
    bits_per_byte: float


def load_texts(data: str) -> list[str]:
    """`heldout` / `val` (stdlib corpus splits of this interpreter), or a text file, or a folder of .py/.txt."""
    if data in (corpus.Split.HELDOUT.value, corpus.Split.VAL.value):
        return [f.text for f in corpus.load_split(data)]
    path = Path(data)
    if path.is_file():
        return [path.read_text(encoding="utf-8", errors="replace")]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".py", ".txt", ".md") and p.is_file())
        if not files:
            raise FileNotFoundError(f"{path}: no .py, .txt or .md files")
        return [p.read_text(encoding="utf-8", errors="replace") for p in files]
    raise FileNotFoundError(f"--data {data!r} is neither 'heldout', 'val', a file nor a folder")


def token_stream(tokenizer, texts: list[str]) -> list[int]:
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text, add_special_tokens=False, verbose=False))
        if eos is not None:
            ids.append(eos)
    return ids


@torch.inference_mode()
def perplexity(logits_fn: Callable[[torch.Tensor], torch.Tensor], ids: list[int], n_bytes: int,
               seq_len: int = 512, batch_size: int = 8, device: str | torch.device = "cpu",
               progress: bool = True) -> PerplexityResult:
    """logits_fn: tokens [B, T] -> logits [B, T, V]. Non-overlapping windows of seq_len predicted tokens."""
    stream = torch.tensor(ids, dtype=torch.long)
    n_windows = (stream.numel() - 1) // seq_len
    if n_windows == 0:
        raise ValueError(f"text has {stream.numel()} tokens, fewer than one window of {seq_len + 1}")
    windows = torch.stack([stream[i * seq_len : i * seq_len + seq_len + 1] for i in range(n_windows)])
    total = 0.0
    for start in tqdm(range(0, n_windows, batch_size), desc="eval-ppl", unit="batch", disable=not progress):
        x = windows[start : start + batch_size].to(device)
        logits = logits_fn(x[:, :-1]).float()
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum").item()
    n_tokens = n_windows * seq_len
    # bytes covered by the evaluated windows (the unevaluated tail is excluded pro rata)
    covered_bytes = n_bytes * n_tokens / (stream.numel() - 1)
    nll = total / n_tokens
    return PerplexityResult(perplexity=math.exp(nll), nll=nll, tokens=n_tokens, bytes=int(covered_bytes),
                            bits_per_byte=total / math.log(2) / covered_bytes)


def unigram_perplexity(train_ids: list[int], eval_ids: list[int], vocab_size: int) -> float:
    """Baseline: perplexity of add-one-smoothed training-token frequencies on the evaluation tokens."""
    counts = torch.bincount(torch.tensor(train_ids), minlength=vocab_size).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return math.exp(-logp[torch.tensor(eval_ids)].mean().item())
