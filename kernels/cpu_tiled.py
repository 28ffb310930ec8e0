"""CPU unstructured sparse linear: y = x @ W.T (+ bias), W a ``PackedTiled`` (bf16 values), fp32 accumulate.

Kernel (kernels/cpu/impl.h, ``tiled``): one row of x: per segment, gathers of x by the in-tile column (8 or
16 at a time) times the widened values; 2+ rows: x transposed to [K, M rounded up to 8] and per kept weight
one broadcast value times the batch rows (8 per vector, up to 32 per pass). Threads over output rows.
Reference: ``linear_tiled_reference``.
"""

from __future__ import annotations

import torch

from ._cpu_ext import extension, isa
from ._launch import flatten_rows
from .cpu_formats import PackedTiled, _check_x, linear_tiled_reference

__all__ = ["linear_tiled_cpu"]


def linear_tiled_cpu(x: torch.Tensor, packed: PackedTiled, bias: torch.Tensor | None = None) -> torch.Tensor:
    _check_x(x, packed.shape, bias)
    ext, path = extension(), isa()
    if ext is None or path is None or x.device.type != "cpu":
        return linear_tiled_reference(x, packed, bias)
    n, k = packed.shape
    x2 = flatten_rows(x).float().contiguous()
    y = ext.tiled(x2, packed.values, packed.cols, packed.tile_ptr, packed.row_ptr, n, k, packed.tile,
                  None if bias is None else bias.float().contiguous(), path)
    return y.reshape(*x.shape[:-1], n).to(x.dtype)
