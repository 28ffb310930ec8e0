"""One entry point for sparse linears: Triton on CUDA, the torch reference elsewhere.

Triton is imported only when a Triton kernel is about to run, so ``import sparsedial.kernels`` works on a
CPU-only machine without triton installed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sparsedial.engine.options import Backend, parse  # the engine's Backend enum: one type for both

from ._launch import KernelPath, interpreter_enabled
from .formats import Packed24, PackedBitmap, PackedCols, unpack_cols
from .nested import PackedNested, linear_nested_reference
from .reference import check_linear_inputs, linear_24_reference, linear_bitmap_reference

__all__ = ["DENSE_PREFILL_MIN_M", "Backend", "sparse_linear"]

# From this many rows, path="auto" of a 2:4, bitmap or cols weight runs dense cuBLAS (F.linear) on the weight
# unpacked by one Triton launch: at prefill sizes the GEMM is compute-bound, so a sparse tier pays one pass
# over its packed bytes (plus 2 bytes a weight written) instead of a dot kernel that runs the same
# tensor-core FLOPs as dense with the expansion on top. Not timed (no GPU lent, issue 14).
DENSE_PREFILL_MIN_M = 16


def sparse_linear(
    x: torch.Tensor,
    packed: Packed24 | PackedBitmap | PackedCols | PackedNested,
    bias: torch.Tensor | None = None,
    *,
    backend: Backend | str = Backend.AUTO,
    path: KernelPath = "auto",
    tier: int | None = None,
) -> torch.Tensor:
    """y = x @ W.T + bias for a packed sparse W [N, K]. x: [..., K] -> y: [..., N] (dtype of x).

    backend: "auto" runs Triton when x is on CUDA and the torch reference otherwise; "triton" forces the
        kernels (CUDA, or CPU tensors under TRITON_INTERPRET=1); "torch" forces the reference.
    path: Triton kernel choice, "gemv" (decode), "dot" (prefill) or "auto" (by the number of rows: from
        ``DENSE_PREFILL_MIN_M`` rows a 2:4, bitmap or cols weight is unpacked by a Triton kernel and run by dense
        ``F.linear`` / cuBLAS, the prefill fallback); ``PackedNested`` and ``PackedCols`` have only gemv
        kernels (any number of rows).
    tier: which tier of a ``PackedNested`` (0 = sparsest) W is; required for it, not allowed otherwise.
    """
    if not isinstance(packed, (Packed24, PackedBitmap, PackedCols, PackedNested)):
        kind = type(packed).__name__
        raise ValueError(f"packed must be a Packed24, PackedBitmap, PackedCols or PackedNested, got {kind}")  # noqa: TRY004
    if isinstance(packed, PackedNested):
        if tier is None:
            raise ValueError("a PackedNested weight needs tier= (0 = sparsest tier)")
        packed.check_tier(tier)
    elif tier is not None:
        kind = type(packed).__name__
        raise ValueError(f"tier= applies to PackedNested only, got tier={tier!r} for a {kind}")
    backend = parse(Backend, backend, "backend")
    use_triton = backend is Backend.TRITON or (backend is Backend.AUTO and x.is_cuda)
    if use_triton and not (x.is_cuda or interpreter_enabled()):
        raise ValueError(f"backend='triton' needs CUDA tensors or TRITON_INTERPRET=1; x is on {x.device}")
    if not use_triton:
        if isinstance(packed, PackedNested):
            return linear_nested_reference(x, packed, tier, bias)
        if isinstance(packed, Packed24):
            return linear_24_reference(x, packed, bias)
        if isinstance(packed, PackedCols):
            check_linear_inputs(x, packed, bias)
            return F.linear(x, unpack_cols(packed), None if bias is None else bias.to(x.dtype))
        return linear_bitmap_reference(x, packed, bias)
    if isinstance(packed, PackedNested):
        from .triton_nested import linear_nested_triton

        return linear_nested_triton(x, packed, tier, bias, path=path)
    if path == "auto" and x.numel() >= DENSE_PREFILL_MIN_M * x.shape[-1]:  # prefill: cuBLAS on the unpacked W
        check_linear_inputs(x, packed, bias)
        return F.linear(x, _unpack_triton(packed), None if bias is None else bias.to(x.dtype))
    if isinstance(packed, Packed24):
        from .triton_24 import linear_24_triton

        return linear_24_triton(x, packed, bias, path=path)
    if isinstance(packed, PackedCols):
        from .triton_cols import linear_cols_triton

        return linear_cols_triton(x, packed, bias, path=path)
    from .triton_bitmap import linear_bitmap_triton

    return linear_bitmap_triton(x, packed, bias, path=path)


def _unpack_triton(packed: Packed24 | PackedBitmap | PackedCols) -> torch.Tensor:
    """Dense [N, K] of a 2:4, bitmap or cols pack by its Triton unpack kernel (no host sync)."""
    if isinstance(packed, Packed24):
        from .triton_24 import unpack_24_triton

        return unpack_24_triton(packed)
    if isinstance(packed, PackedCols):
        from .triton_cols import unpack_cols_triton

        return unpack_cols_triton(packed)
    from .triton_bitmap import unpack_bitmap_triton

    return unpack_bitmap_triton(packed)
