"""Calibration data: N sequences x T tokens, seeded, never from held-out text.

Sources: `stdlib` (the training split of the running interpreter's standard library; the default for the
embedded model), a text file or a folder of .py/.txt/.md files, or `c4` / `wikitext2` by name when the
`datasets` package and a network are available (their standard calibration splits: C4 `en` train shard 0,
WikiText-2 raw train).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sparsedial import corpus


@dataclass(frozen=True)
class CalibrationConfig:
    """Which text and how much of it; written into elastic.json as provenance."""

    source: str = "stdlib"
    """'stdlib', 'c4', 'wikitext2', or a path to a text file / folder."""
    n_samples: int = 64
    """Number of sequences."""
    seq_len: int = 256
    """Tokens per sequence."""
    seed: int = 0
    """Seed of the window sampler."""

    def __post_init__(self) -> None:
        if self.n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {self.n_samples}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")


def _texts(source: str) -> list[str]:
    if source == "stdlib":
        return [f.text for f in corpus.load_split(corpus.Split.TRAIN)]
    if source in ("c4", "wikitext2"):
        try:
            from datasets import load_dataset
        except ImportError:
            raise ValueError(f"calibration source {source!r} needs the `datasets` package "
                             "(pip install datasets) and network access") from None
        if source == "c4":
            ds = load_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"},
                              split="train")
        else:
            ds = load_dataset("wikitext", "wikitext-2-raw-v1", split="train")
        return [r["text"] for r in ds]
    path = Path(source)
    if path.is_file():
        return [path.read_text(encoding="utf-8", errors="replace")]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".py", ".txt", ".md"))
        if files:
            return [p.read_text(encoding="utf-8", errors="replace") for p in files]
        raise ValueError(f"calibration folder {path} has no .py, .txt or .md files")
    raise ValueError(f"calibration source {source!r} is not 'stdlib', 'c4', 'wikitext2', a file or a folder")


def calibration_tokens(tokenizer, cfg: CalibrationConfig) -> torch.Tensor:
    """[n_samples, seq_len] int64 token windows drawn uniformly (seeded) from the source's token stream."""
    from sparsedial.evaluate import token_stream

    return sample_windows(torch.tensor(token_stream(tokenizer, _texts(cfg.source)), dtype=torch.long), cfg)


def sample_windows(stream: torch.Tensor, cfg: CalibrationConfig) -> torch.Tensor:
    """[n_samples, seq_len] windows at seeded uniform offsets of a 1-D token stream."""
    if stream.numel() <= cfg.seq_len:
        raise ValueError(f"calibration source {cfg.source!r} has {stream.numel()} tokens, "
                         f"fewer than one sequence of {cfg.seq_len}")
    gen = torch.Generator().manual_seed(cfg.seed)
    starts = torch.randint(0, stream.numel() - cfg.seq_len, (cfg.n_samples,), generator=gen)
    return torch.stack([stream[s : s + cfg.seq_len] for s in starts.tolist()])
