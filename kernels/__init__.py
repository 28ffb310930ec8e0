"""Sparse weight formats, Triton sparse matmul kernels, torch references and one dispatch entry point.

Importing this package never imports triton: the Triton launchers (``triton_24``, ``triton_bitmap``,
``triton_nested``) are loaded by ``sparse_linear`` only when a kernel runs (CUDA tensors, or
TRITON_INTERPRET=1). The packed CPU tier formats (``cpu_formats``) run through ``cpu_linear`` (the C++
kernels of kernels/cpu/, compiled on first use, or their torch references); importing builds nothing.
"""

from .cpu_dispatch import cpu_linear
from .cpu_formats import (
    PackedBitmask,
    PackedDense,
    linear_bitmask_reference,
    linear_cols_bf16_reference,
    linear_dense_bf16_reference,
    pack_bitmask,
    pack_cols_bf16,
    pack_dense_bf16,
    unpack_bitmask,
    unpack_dense,
)
from .dispatch import Backend, sparse_linear
from .formats import Packed24, PackedBitmap, pack_24, pack_bitmap, unpack_24, unpack_bitmap
from .nested import PackedNested, linear_nested_reference, pack_nested, unpack_nested
from .reference import linear_24_reference, linear_bitmap_reference

__all__ = [
    "Backend",
    "Packed24",
    "PackedBitmap",
    "PackedBitmask",
    "PackedDense",
    "PackedNested",
    "cpu_linear",
    "linear_24_reference",
    "linear_bitmap_reference",
    "linear_bitmask_reference",
    "linear_cols_bf16_reference",
    "linear_dense_bf16_reference",
    "linear_nested_reference",
    "pack_24",
    "pack_bitmap",
    "pack_bitmask",
    "pack_cols_bf16",
    "pack_dense_bf16",
    "pack_nested",
    "sparse_linear",
    "unpack_24",
    "unpack_bitmap",
    "unpack_bitmask",
    "unpack_dense",
    "unpack_nested",
]
