"""CPU sparse linear: y = x @ W.T (+ bias), W a ``PackedBitmask`` (bf16 values + 16-bit masks), fp32 accumulate.

Kernel (kernels/cpu/impl.h, ``bitmask``): per block of 4 output rows and 16 inputs, the rows' mask words and
their next popcount(mask) values, widened and expanded into dense vectors (AVX-512: a vpermps by prefix
popcounts; AVX2: a pshufb table per mask byte) that feed up to 4 (AVX2: 2) rows of x per pass. Threads over
blocks of rows. Reference: ``linear_bitmask_reference``.
"""

from __future__ import annotations

import torch

from ._cpu_ext import extension, isa
from ._launch import flatten_rows
from .cpu_formats import PackedBitmask, _check_x, linear_bitmask_reference

__all__ = ["linear_bitmask_cpu"]


def linear_bitmask_cpu(x: torch.Tensor, packed: PackedBitmask, bias: torch.Tensor | None = None) -> torch.Tensor:
    _check_x(x, packed.shape, bias)
    ext, path = extension(), isa()
    if ext is None or path is None or x.device.type != "cpu":
        return linear_bitmask_reference(x, packed, bias)
    n, k = packed.shape
    x2 = flatten_rows(x).float().contiguous()
    y = ext.bitmask(x2, packed.values, packed.masks, packed.block_ptr, n, k,
                    None if bias is None else bias.float().contiguous(), path)
    return y.reshape(*x.shape[:-1], n).to(x.dtype)
