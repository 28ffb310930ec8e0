"""CPU unstructured sparse linear: y = x @ W.T (+ bias), W a ``PackedCols`` with bf16 values (``pack_cols_bf16``).

Kernel (kernels/cpu/impl.h, ``tiled``): one row of x: per run, gathers of x by the in-tile column (8 or 16
at a time) times the widened values; 2+ rows: x transposed to [K, M rounded up to 8] and per kept weight
one broadcast value times the batch rows (8 per vector, up to 32 per pass). Threads over output rows.
Reference: ``linear_cols_bf16_reference`` (also for values in another dtype, which the kernel does not read).
"""

from __future__ import annotations

import torch

from ._cpu_ext import launch
from .cpu_formats import linear_cols_bf16_reference
from .formats import COLS_TILE, PackedCols

__all__ = ["linear_cols_cpu"]


def linear_cols_cpu(x: torch.Tensor, packed: PackedCols, bias: torch.Tensor | None = None) -> torch.Tensor:
    if packed.values.dtype != torch.bfloat16:
        return linear_cols_bf16_reference(x, packed, bias)
    n, k = packed.shape
    return launch(x, packed, bias, linear_cols_bf16_reference,
                  lambda ext, x2, b, path: ext.tiled(x2, packed.values, packed.cols, packed.run_ptr, n, k,
                                                     COLS_TILE, b, path))
