"""CPU dense bf16 linear: y = x @ W.T (+ bias), W a ``PackedDense`` (bf16), x / y fp32, fp32 accumulate.

Kernel (kernels/cpu/impl.h, ``dense_bf16``): register blocks of 4 output rows x 3 rows of x (AVX2; 4 x 6
with AVX-512), one widened bf16 weight vector feeding every row of x, threads over output rows.
Reference: ``linear_dense_bf16_reference``.
"""

from __future__ import annotations

import torch

from ._cpu_ext import launch
from .cpu_formats import PackedDense, linear_dense_bf16_reference

__all__ = ["linear_dense_bf16_cpu"]


def linear_dense_bf16_cpu(x: torch.Tensor, packed: PackedDense, bias: torch.Tensor | None = None) -> torch.Tensor:
    return launch(x, packed, bias, linear_dense_bf16_reference,
                  lambda ext, x2, b, path: ext.dense_bf16(x2, packed.values, b, path))
