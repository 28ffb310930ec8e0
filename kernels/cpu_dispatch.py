"""One entry point for the packed CPU tier formats: ``cpu_linear(x, packed, bias)``."""

from __future__ import annotations

import torch

from .cpu_bitmask import linear_bitmask_cpu
from .cpu_cols import linear_cols_cpu
from .cpu_dense import linear_dense_bf16_cpu
from .cpu_formats import PackedBitmask, PackedDense
from .formats import PackedCols

__all__ = ["CpuPacked", "cpu_linear"]

CpuPacked = PackedDense | PackedBitmask | PackedCols


def cpu_linear(x: torch.Tensor, packed: CpuPacked, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T + bias for a CPU-packed W: the C++ kernel, or its torch reference where it cannot run."""
    if isinstance(packed, PackedBitmask):
        return linear_bitmask_cpu(x, packed, bias)
    if isinstance(packed, PackedCols):
        return linear_cols_cpu(x, packed, bias)
    if isinstance(packed, PackedDense):
        return linear_dense_bf16_cpu(x, packed, bias)
    raise ValueError(f"not a CPU packed weight: {type(packed).__name__}")
