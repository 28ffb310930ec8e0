"""Sparse weight formats, Triton sparse matmul kernels, torch references and one dispatch entry point.

Importing this package never imports triton: the Triton launchers (``triton_24``, ``triton_bitmap``,
``triton_nested``) are loaded by ``sparse_linear`` only when a kernel runs (CUDA tensors, or
TRITON_INTERPRET=1).
"""

from .dispatch import Backend, sparse_linear
from .formats import Packed24, PackedBitmap, pack_24, pack_bitmap, unpack_24, unpack_bitmap
from .nested import PackedNested, linear_nested_reference, pack_nested, unpack_nested
from .reference import linear_24_reference, linear_bitmap_reference

__all__ = [
    "Backend",
    "Packed24",
    "PackedBitmap",
    "PackedNested",
    "linear_24_reference",
    "linear_bitmap_reference",
    "linear_nested_reference",
    "pack_24",
    "pack_bitmap",
    "pack_nested",
    "sparse_linear",
    "unpack_24",
    "unpack_bitmap",
    "unpack_nested",
]
