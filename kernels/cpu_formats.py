"""Packed CPU tier formats (bf16 values, fp32 accumulate) and their torch references.

Every format stores a linear's weight ``W: [N, K]`` (N = out features, K = in features) as bf16 values, the
format the CPU kernels of kernels/cpu/ read; x, the accumulation and y stay fp32. Packing rounds values to
bf16 (round to nearest even) and is otherwise exact: ``unpack(pack(W, mask)) == (W * mask).bfloat16()``.

* ``PackedDense`` (dense tiers): bf16 ``[N, K]`` row-major, 2 bytes/weight.
* ``PackedBitmask`` (unstructured tiers from 45% and 2:4): one 16-bit mask per 16 inputs and the kept
  values, in blocks of 4 output rows, each block one sequential run of bytes in the kernel's reading order;
  2 (1 - s) + 0.125 bytes/weight: 50% -> 1.125, 70% -> 0.725, 2:4 -> 1.125. Its kernel expands each 16
  inputs to a dense vector (the FMAs stay dense), so it wins wherever the bytes bound the matmul (one to a
  few rows of x).
* ``formats.PackedCols`` with bf16 values (``pack_cols_bf16``; 80-90% tiers, for several rows; per ISA
  path, engine/linear.py ``SPARSE_FORMATS``): the GPU's values + one-byte column format, read as is by the
  CPU tiled kernel: per (row, 256-input tile) a run of values + in-tile columns, padded to a multiple of 8
  entries, runs row-major, one int32 start per run. 3 bytes per kept weight + padding (about 3.5 entries
  per run: ~0.04 bytes/weight) + 4 bytes per run (0.016): 90% -> ~0.36 bytes/weight. Its kernel's work
  scales with the kept weights (gathers of x by column at one row, one broadcast FMA per kept weight over
  the batch rows), which wins over the bitmask at 4+ rows once few weights are kept.

Which tier gets which format is engine/linear.py's choice (``_cpu_pack``), from the measurements in
docs/benchmarks.md, "CPU kernels".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .formats import PackedCols, _check_mask, _check_weight, _nbytes, pack_cols, unpack_cols

__all__ = [
    "PackedBitmask",
    "PackedDense",
    "linear_bitmask_reference",
    "linear_cols_bf16_reference",
    "linear_dense_bf16_reference",
    "pack_bitmask",
    "pack_cols_bf16",
    "pack_dense_bf16",
    "unpack_bitmask",
    "unpack_dense",
]


@dataclass(frozen=True)
class PackedDense:
    """A dense tier's weight as bf16 ``[N, K]`` (row-major, contiguous)."""

    values: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.values.shape)  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        return _nbytes(self.values)


def pack_dense_bf16(weight: torch.Tensor) -> PackedDense:
    _check_weight(weight)
    return PackedDense(weight.detach().to(torch.bfloat16).contiguous())


def unpack_dense(packed: PackedDense) -> torch.Tensor:
    return packed.values


def pack_cols_bf16(weight: torch.Tensor, mask: torch.Tensor | None = None) -> PackedCols:
    """``formats.pack_cols`` (values + one-byte column per 256-input tile, runs padded to 8) with the values
    rounded to bf16: the CPU tiled kernel's weight (kernels/cpu/impl.h, ``tiled``)."""
    _check_weight(weight)
    keep = _check_mask(mask, weight)  # the positions of the fp32 weight: bf16 rounding may zero a kept value
    return pack_cols(weight.detach().to(torch.bfloat16), keep)


_GROUP = 16  # inputs per mask word
_ROWS = 4  # output rows per block (kernels/cpu/sd_cpu.h, kBitmaskRows)
_PAD = 16  # zero values after the last block: the kernels load 16 values from any position


@dataclass(frozen=True)
class PackedBitmask:
    """A sparse weight as 16-bit masks per 16 inputs and the kept values (bf16), in blocks of 4 output rows.

    One block is one sequential run of bytes in the order the kernel reads it: per 16 inputs g, the 4 rows'
    masks side by side, and per g the 4 rows' kept values one row after the other.

    values:    [L + 16] bf16, block by block, group by group, row by row, inputs ascending; then 16 zeros.
    masks:     [ceil(N / 4), ceil(K / 16), 4] int16 (the 16 bits of the word): bit j of masks[b, g, i] says
               input 16 g + j of row 4 b + i is kept (rows past N: no bits).
    block_ptr: [ceil(N / 4) + 1] int64, start of each block's values.
    shape:     (N, K).
    """

    values: torch.Tensor
    masks: torch.Tensor
    block_ptr: torch.Tensor
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        """A bitmask whose masks disagree with its offsets would make the kernel read past `values`: checked
        here once (in C++, where the extension runs; the torch reference raises on such input anyway)."""
        from ._cpu_ext import extension

        ext = extension() if self.values.device.type == "cpu" else None
        if ext is not None and not ext.bitmask_valid(self.values, self.masks, self.block_ptr, *self.shape):
            raise ValueError(f"inconsistent PackedBitmask of shape {self.shape}: its masks, block offsets and "
                             f"values disagree (build it with pack_bitmask)")

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(t) for t in (self.values, self.masks, self.block_ptr))


def _blocked(t: torch.Tensor, rows: int, groups: int) -> torch.Tensor:
    """[N, K] -> [N/4, G, 4, 16] (zero padded): the bitmask format's order of positions."""
    n, k = t.shape
    t = F.pad(t, (0, groups * _GROUP - k, 0, rows - n))
    return t.reshape(rows // _ROWS, _ROWS, groups, _GROUP).transpose(1, 2)


def pack_bitmask(weight: torch.Tensor, mask: torch.Tensor | None = None) -> PackedBitmask:
    """Pack ``weight * mask`` (mask None: the nonzeros of weight) into the bitmask format, values as bf16."""
    _check_weight(weight)
    n, k = weight.shape
    keep = _check_mask(mask, weight)
    if weight.device.type == "cpu":
        from ._cpu_ext import extension

        ext = extension()
        if ext is not None:  # the C++ packer: one pass per block (the torch path below: ~10x the time)
            values, words, block_ptr = ext.pack_bitmask(weight.detach().float().contiguous(), keep.contiguous())
            return PackedBitmask(values, words, block_ptr, (n, k))
    return _pack_bitmask_torch(weight, keep)


def _pack_bitmask_torch(weight: torch.Tensor, keep: torch.Tensor) -> PackedBitmask:
    n, k = weight.shape
    groups, rows = -(-k // _GROUP), -(-n // _ROWS) * _ROWS
    keep_b = _blocked(keep, rows, groups).contiguous()  # [B, G, 4, 16]
    # 16 bits per (block, group, row): little-endian bit order, two bytes -> one 16-bit word
    bits = np.packbits(keep_b.cpu().numpy(), axis=-1, bitorder="little")  # [B, G, 4, 2] uint8
    words = torch.from_numpy(bits.view("<i2")[..., 0].copy()).to(weight.device)  # [B, G, 4] int16
    per_row = F.pad(keep.sum(1), (0, rows - n))  # kept per row, rows padded to whole blocks
    block_ptr = torch.zeros(rows // _ROWS + 1, dtype=torch.int64, device=weight.device)
    block_ptr[1:] = per_row.reshape(-1, _ROWS).sum(1).cumsum(0)
    w_b = _blocked(weight.detach().to(torch.bfloat16), rows, groups).contiguous()
    kept = w_b.masked_select(keep_b)  # in the format's order
    values = torch.cat([kept, torch.zeros(_PAD, dtype=torch.bfloat16, device=weight.device)])
    return PackedBitmask(values, words.contiguous(), block_ptr, (n, k))


def unpack_bitmask(packed: PackedBitmask) -> torch.Tensor:
    """Dense [N, K] bf16 weight with zeros at the dropped positions."""
    n, k = packed.shape
    blocks, groups, _ = packed.masks.shape
    bits = torch.ones((), dtype=torch.int32) << torch.arange(_GROUP, dtype=torch.int32)
    keep_b = ((packed.masks.to(torch.int32) & 0xFFFF).unsqueeze(-1) & bits) != 0  # [B, G, 4, 16]
    dense_b = torch.zeros(keep_b.shape, dtype=torch.bfloat16, device=packed.values.device)
    dense_b[keep_b] = packed.values[: int(packed.block_ptr[-1])]
    return dense_b.transpose(1, 2).reshape(blocks * _ROWS, groups * _GROUP)[:n, :k]


def _linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 F.linear of x against the widened bf16 weight; result in x's dtype."""
    y = F.linear(x.float(), w.float(), None if bias is None else bias.float())
    return y.to(x.dtype)


def _check_x(x: torch.Tensor, shape: tuple[int, int], bias: torch.Tensor | None) -> None:
    n, k = shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x must have shape [..., {k}] for a weight of shape {shape}, got {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")


def linear_dense_bf16_reference(x: torch.Tensor, packed: PackedDense, bias: torch.Tensor | None = None):
    """y = x @ W.T + bias, W the bf16 weight widened to fp32. x: [..., K] -> [..., N] (dtype of x)."""
    _check_x(x, packed.shape, bias)
    return _linear(x, packed.values, bias)


def linear_cols_bf16_reference(x: torch.Tensor, packed: PackedCols, bias: torch.Tensor | None = None):
    _check_x(x, packed.shape, bias)
    return _linear(x, unpack_cols(packed), bias)


def linear_bitmask_reference(x: torch.Tensor, packed: PackedBitmask, bias: torch.Tensor | None = None):
    _check_x(x, packed.shape, bias)
    return _linear(x, unpack_bitmask(packed), bias)
