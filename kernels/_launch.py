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
    split_k: int | None = None  # gemv only: K splits (None = choose_split_k's)


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


def gemv_output(x2: torch.Tensor, n: int, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """y [M, N] (dtype of x, uninitialised) and the bias pointer a kernel takes (y itself when no bias)."""
    y = torch.empty(x2.shape[0], n, dtype=x2.dtype, device=x2.device)
    return y, (bias.to(x2.dtype).contiguous() if bias is not None else y)


def fill_bias(y: torch.Tensor, bias: torch.Tensor | None) -> None:
    """y = bias broadcast over the rows (zeros without one): the result when there are no rows or no weights."""
    y.copy_(bias.to(y.dtype).expand_as(y) if bias is not None else torch.zeros_like(y))


# Split-K: below this many programs per SM (H100: 132 SMs) a GEMV splits K, so small-N layers still keep
# every SM busy with several programs (latency hiding comes from programs in flight, not from the grid).
NUM_SMS = 132
SPLIT_K_TARGET_PROGRAMS = 4 * NUM_SMS
SPLIT_K_MAX = 16
_LOCKS: dict[torch.device, torch.Tensor] = {}


def choose_split_k(tiles: int, k: int, block_k: int, min_steps: int = 2) -> int:
    """Splits of K (a power of 2) for `tiles` output tiles: enough for SPLIT_K_TARGET_PROGRAMS programs,
    each split keeping >= min_steps K steps of block_k."""
    split = 1
    steps = -(-k // block_k)
    while tiles * split < SPLIT_K_TARGET_PROGRAMS and split < SPLIT_K_MAX and steps >= 2 * min_steps * split:
        split *= 2
    return split


def split_k_chunk(k: int, block_k: int, split: int) -> int:
    """Inputs per split: whole K steps, so every split but the last covers the same range."""
    steps = -(-k // block_k)
    return -(-steps // split) * block_k


def split_k_buffers(m: int, n: int, split: int, tiles: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 partials [split, M, N] and the per-tile counters (zero between launches: the kernels reset them).

    The counters are shared by every launch on a device, so split-K launches must not run concurrently on two
    streams (the engine runs its layers in one stream)."""
    if split == 1:  # never touched by the kernel: dummies (torch.empty launches nothing)
        return torch.empty(1, dtype=torch.float32, device=device), torch.empty(1, dtype=torch.int32, device=device)
    locks = _LOCKS.get(device)
    if locks is None or locks.numel() < tiles:
        locks = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
        _LOCKS[device] = locks
    return torch.empty(split, m, n, dtype=torch.float32, device=device), locks
