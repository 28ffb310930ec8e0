"""CPU dense bf16 linear: y = x @ W.T (+ bias), W a ``PackedDense`` (bf16), x / y fp32, fp32 accumulate.

Kernel (kernels/cpu/impl.h, ``dense_bf16``): register blocks of 4 output rows x 3 rows of x (AVX2; 4 x 6
with AVX-512), one widened bf16 weight vector feeding every row of x, threads over output rows.
Reference: ``linear_dense_bf16_reference``.
"""

from __future__ import annotations

import torch

from ._cpu_ext import extension, isa
from ._launch import flatten_rows
from .cpu_formats import PackedDense, _check_x, linear_dense_bf16_reference

__all__ = ["linear_dense_bf16_cpu"]


def linear_dense_bf16_cpu(x: torch.Tensor, packed: PackedDense, bias: torch.Tensor | None = None) -> torch.Tensor:
    _check_x(x, packed.shape, bias)
    ext, path = extension(), isa()
    if ext is None or path is None or x.device.type != "cpu":
        return linear_dense_bf16_reference(x, packed, bias)
    x2 = flatten_rows(x).float().contiguous()
    y = ext.dense_bf16(x2, packed.values, None if bias is None else bias.float().contiguous(), path)
    return y.reshape(*x.shape[:-1], packed.shape[0]).to(x.dtype)
