"""CPU unstructured sparse linear: y = x @ W.T (+ bias), W a ``PackedTiled`` (bf16 values), fp32 accumulate.

Kernel (kernels/cpu/impl.h, ``tiled``): one row of x: per segment, gathers of x by the in-tile column (8 or
16 at a time) times the widened values; 2+ rows: x transposed to [K, M rounded up to 8] and per kept weight
one broadcast value times the batch rows (8 per vector, up to 32 per pass). Threads over output rows.
Reference: ``linear_tiled_reference``.
"""

from __future__ import annotations

import torch

from ._cpu_ext import launch
from .cpu_formats import PackedTiled, linear_tiled_reference

__all__ = ["linear_tiled_cpu"]


def linear_tiled_cpu(x: torch.Tensor, packed: PackedTiled, bias: torch.Tensor | None = None) -> torch.Tensor:
    n, k = packed.shape
    return launch(x, packed, bias, linear_tiled_reference,
                  lambda ext, x2, b, path: ext.tiled(x2, packed.values, packed.cols, packed.tile_ptr, packed.row_ptr,
                                                     n, k, packed.tile, b, path))
