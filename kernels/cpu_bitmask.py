"""CPU sparse linear: y = x @ W.T (+ bias), W a ``PackedBitmask`` (bf16 values + 16-bit masks), fp32 accumulate.

Kernel (kernels/cpu/impl.h, ``bitmask``): per block of 4 output rows and 16 inputs, the rows' mask words and
their next popcount(mask) values, widened and expanded into dense vectors (AVX-512: a vpermps by prefix
popcounts; AVX2: a pshufb table per mask byte) that feed up to 8 (AVX2: 4) rows of x in registers; more rows
expand each 512 inputs once into an L1 scratch read by passes of 4 (AVX2: 2) rows. Threads over blocks of
rows. Reference: ``linear_bitmask_reference``.
"""

from __future__ import annotations

import torch

from ._cpu_ext import launch
from .cpu_formats import PackedBitmask, linear_bitmask_reference

__all__ = ["linear_bitmask_cpu"]


def linear_bitmask_cpu(x: torch.Tensor, packed: PackedBitmask, bias: torch.Tensor | None = None) -> torch.Tensor:
    n, k = packed.shape
    return launch(x, packed, bias, linear_bitmask_reference,
                  lambda ext, x2, b, path: ext.bitmask(x2, packed.values, packed.masks, packed.block_ptr, n, k, b, path))
