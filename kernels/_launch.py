"""Launcher helpers shared by the Triton kernel files (no triton import here)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch

KernelPath = Literal["auto", "gemv", "dot"]

# Largest M served by the GEMV (FMA) kernels under path="auto"; above it the tl.dot kernels run.
# Chosen from benchmarks/bench_kernels.py on an H100 (docs/benchmarks.md, "Kernels").
GEMV_MAX_M = 8


@dataclass(frozen=True)
class KernelConfig:
    """Tile of one Triton program: BLOCK_M rows of x, BLOCK_N output features, BLOCK_K inputs per step."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2


def interpreter_enabled() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def choose_path(path: KernelPath, m: int) -> Literal["gemv", "dot"]:
    if path == "auto":
        return "gemv" if m <= GEMV_MAX_M else "dot"
    if path not in ("gemv", "dot"):
        raise ValueError(f"path must be 'auto', 'gemv' or 'dot', got {path!r}")
    return path


def flatten_rows(x: torch.Tensor) -> torch.Tensor:
    """x: [..., K] -> [M, K] with unit stride along K (copies only when needed)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def check_triton_device(x: torch.Tensor) -> None:
    if not x.is_cuda and not interpreter_enabled():
        raise ValueError(
            f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter); x is on {x.device}"
        )
