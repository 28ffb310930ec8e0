"""CPU 2:4 sparse linear: y = x @ W.T (+ bias), W a ``Packed24`` with bf16 values, fp32 accumulate.

Kernel (kernels/cpu/impl.h, ``nm24``): per 16 inputs, 8 widened values are expanded to two dense 8-lane
vectors by a 256-entry permute table indexed by a meta byte (4 two-bit positions), then FMAs with up to 4
rows of x per pass. Threads over output rows. Reference: ``linear_24_bf16_reference``.
"""

from __future__ import annotations

import torch

from ._cpu_ext import extension, isa
from ._launch import flatten_rows
from .cpu_formats import _check_x, linear_24_bf16_reference
from .formats import Packed24

__all__ = ["linear_24_cpu"]


def linear_24_cpu(x: torch.Tensor, packed: Packed24, bias: torch.Tensor | None = None) -> torch.Tensor:
    _check_x(x, packed.shape, bias)
    ext, path = extension(), isa()
    if ext is None or path is None or x.device.type != "cpu" or packed.values.dtype != torch.bfloat16:
        return linear_24_bf16_reference(x, packed, bias)
    n, k = packed.shape
    x2 = flatten_rows(x).float().contiguous()
    meta = packed.meta.contiguous().view(torch.uint8)  # [N, 4 * words]: byte i = positions of values 4i..4i+3
    y = ext.nm24(x2, packed.values, meta, k, None if bias is None else bias.float().contiguous(), path)
    return y.reshape(*x.shape[:-1], n).to(x.dtype)
