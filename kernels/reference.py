"""Torch references for the sparse linear kernels: unpack to dense, then ``F.linear``.

These are the numerical ground truth in tests and the CPU execution path of ``sparse_linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .formats import Packed24, PackedBitmap, unpack_24, unpack_bitmap

__all__ = ["check_linear_inputs", "linear_24_reference", "linear_bitmap_reference"]


def check_linear_inputs(
    x: torch.Tensor, packed: Packed24 | PackedBitmap, bias: torch.Tensor | None
) -> None:
    """Raise ValueError unless x [..., K], bias [N] and packed [N, K] agree in shape, dtype, device."""
    n, k = packed.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x must have shape [..., {k}] for a weight of shape {packed.shape}, got {tuple(x.shape)}")
    if x.dtype != packed.dtype:
        raise ValueError(f"x dtype {x.dtype} != packed weight dtype {packed.dtype}")
    if x.device != packed.device:
        raise ValueError(f"x is on {x.device} but the packed weight is on {packed.device}")
    if bias is not None:
        if bias.shape != (n,):
            raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")


def linear_24_reference(x: torch.Tensor, packed: Packed24, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T + bias for a 2:4 packed W. x: [..., K] -> y: [..., N] (dtype of x)."""
    check_linear_inputs(x, packed, bias)
    w = unpack_24(packed)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def linear_bitmap_reference(
    x: torch.Tensor, packed: PackedBitmap, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y = x @ W.T + bias for a bitmap packed W. x: [..., K] -> y: [..., N] (dtype of x)."""
    check_linear_inputs(x, packed, bias)
    w = unpack_bitmap(packed)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
