"""Packed sparse weight formats: 2:4 semi-structured and bitmap (unstructured).

Both formats store a linear layer's weight ``W: [N, K]`` (N = out features, K = in features) in
compressed form. Packing is exact: values are copied, never converted, so
``unpack(pack(W, mask)) == where(mask, W, +0.0)`` bit for bit (and ``== W * mask`` as values; only the
sign of dropped zeros can differ).

Byte budget per weight (fp16 values; dense fp16 is 2 bytes, so a decode GEMV that streams its weights is
faster only when a format reads fewer bytes than that, index included):

* ``Packed24``: values ``[N, K/2]`` + a 2-bit index per value = 1 + 0.125 = 1.125 bytes/weight.
* ``PackedBitmap`` at sparsity ``s``: ``2 (1 - s)`` value bytes + 1 bit/weight of bitmap
  (0.125) + one 16-bit offset per 32-weight bitmap word (0.0625) + one int64 row pointer per row
  (``8 / K``, 0.002 at K=4096). The word offsets let a kernel rank a kept weight with one popcount of
  its masked bitmap word instead of a prefix sum over the row (50%: 1.19 bytes/weight, 70%: 0.79).

* ``PackedCols`` (GPU, for >= 70-80% sparsity) at sparsity ``s``: per (row, 256-input tile) the kept
  values (2 bytes) and their one-byte column in the tile, each run padded to a multiple of 8 entries, plus
  one int32 run start per (row, tile): about ``3 (1 - s) + 0.04 + 0.016`` bytes/weight (70%: 0.96, 80%:
  0.66, 90%: 0.36 against the bitmap's 0.79, 0.59, 0.39), but a kernel's work scales with the stored values.

Layouts are neutral (row-major, little-endian bit order) so a backend can repack at load if it needs to.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

__all__ = [
    "COLS_TILE",
    "SUPPORTED_DTYPES",
    "Packed24",
    "PackedBitmap",
    "PackedCols",
    "bitmap_word_offsets",
    "pack_24",
    "pack_bitmap",
    "pack_cols",
    "unpack_24",
    "unpack_bitmap",
    "unpack_cols",
    "values_have_tail",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# 2:4 meta: 16 two-bit indices per int32 word, in value order (value j -> bits 2*(j % 16) of word j // 16).
_IDX_PER_WORD = 16
# Bitmap: 32 weights per int32 word (weight k -> bit k % 32 of word k // 32).
_BITS_PER_WORD = 32
# Word offsets are 16-bit counts of kept values before a word, so a row holds at most 65536 inputs.
_MAX_BITMAP_K = 65536


def _check_weight(weight: torch.Tensor, name: str = "weight") -> None:
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if weight.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} dtype must be one of {SUPPORTED_DTYPES}, got {weight.dtype}")


def _check_mask(mask: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
    """Return a bool mask [N, K]; None means "keep the nonzeros of weight"."""
    if mask is None:
        return weight != 0
    if mask.shape != weight.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(weight.shape)}")
    return mask.to(device=weight.device, dtype=torch.bool)


def _pack_bits(bits: torch.Tensor, width: int) -> torch.Tensor:
    """Pack small unsigned fields into int32 words, little-endian.

    bits: [N, L] integer tensor with values < 2**width, L a multiple of 32 // width.
    Returns [N, L * width // 32] int32 (bit pattern reinterpreted from uint32).
    """
    per_word = _BITS_PER_WORD // width
    n, length = bits.shape
    fields = bits.to(torch.int64).reshape(n, length // per_word, per_word)
    shifts = torch.arange(per_word, device=bits.device, dtype=torch.int64) * width
    words = (fields << shifts).sum(dim=-1)  # [N, W] in [0, 2**32)
    words = torch.where(words >= 2**31, words - 2**32, words)  # uint32 -> int32 bit pattern
    return words.to(torch.int32)


def _unpack_bits(words: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of ``_pack_bits``: [N, W] int32 -> [N, W * 32 // width] int64 fields."""
    per_word = _BITS_PER_WORD // width
    shifts = torch.arange(per_word, device=words.device, dtype=torch.int64) * width
    fields = (words.to(torch.int64)[:, :, None] >> shifts) & ((1 << width) - 1)
    return fields.reshape(words.shape[0], -1)


# --------------------------------------------------------------------------------------------------
# 2:4 semi-structured
# --------------------------------------------------------------------------------------------------


class _PackedTensors:
    """What the packed formats share: dtype and device are those of ``values``, ``nbytes`` counts every tensor
    field, and ``to`` moves every tensor field (the other fields are kept)."""

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def _tensor_fields(self) -> dict[str, torch.Tensor]:
        return {f.name: v for f in fields(self) if isinstance(v := getattr(self, f.name), torch.Tensor)}

    @property
    def nbytes(self) -> int:
        """Bytes of the packed tensors (what a kernel must read)."""
        return sum(_nbytes(t) for t in self._tensor_fields().values())

    def to(self, device: torch.device | str):
        return replace(self, **{name: t.to(device) for name, t in self._tensor_fields().items()})


@dataclass(frozen=True)
class Packed24(_PackedTensors):
    """A 2:4 sparse weight: in each group of 4 consecutive inputs of a row, 2 values are kept.

    values: [N, K/2], the kept values of each group in increasing input order (dtype of the weight).
    meta:   [N, ceil(K/32)] int32; value j of a row sits at input ``4 * (j // 2) + idx_j`` where
            ``idx_j = (meta[n, j // 16] >> (2 * (j % 16))) & 3``. Unused high bits are zero.
    shape:  (N, K) of the dense weight.
    """

    values: torch.Tensor
    meta: torch.Tensor
    shape: tuple[int, int]



def pack_24(weight: torch.Tensor, mask: torch.Tensor | None = None) -> Packed24:
    """Pack ``weight * mask`` into the 2:4 format.

    weight: [N, K] fp16/bf16/fp32 with K divisible by 4.
    mask:   [N, K] bool with exactly 2 True per group of 4 along K; if None, the nonzeros of ``weight``
            are used and groups with fewer than 2 nonzeros are filled with (zero-valued) slots.
    Raises ValueError when K % 4 != 0 or a group keeps more than 2 entries.
    """
    _check_weight(weight)
    n, k = weight.shape
    if k % 4 != 0:
        raise ValueError(f"2:4 packing needs in_features divisible by 4, got K={k}")
    keep = _check_mask(mask, weight)
    groups = keep.reshape(n, k // 4, 4)
    counts = groups.sum(dim=-1)
    if (counts > 2).any():
        raise ValueError("2:4 packing: some group of 4 keeps more than 2 entries")
    if mask is not None and (counts != 2).any():
        raise ValueError("2:4 packing: mask must keep exactly 2 of every 4 inputs")
    # Pick 2 slots per group: kept positions first (stable, so increasing order), then padding slots.
    pos = torch.arange(4, device=weight.device)
    order_key = (~groups).to(torch.int64) * 4 + pos  # kept -> 0..3, dropped -> 4..7
    idx = order_key.argsort(dim=-1)[..., :2].sort(dim=-1).values  # [N, K/4, 2]
    vals = torch.gather(weight.reshape(n, k // 4, 4), 2, idx)
    vals = torch.where(torch.gather(groups, 2, idx), vals, torch.zeros_like(vals))
    idx = idx.reshape(n, k // 2)
    pad = (-idx.shape[1]) % _IDX_PER_WORD
    idx = torch.nn.functional.pad(idx, (0, pad))
    return Packed24(vals.reshape(n, k // 2).contiguous(), _pack_bits(idx, 2).contiguous(), (n, k))


def unpack_24(packed: Packed24) -> torch.Tensor:
    """Dense [N, K] weight with zeros at the dropped positions."""
    n, k = packed.shape
    idx = _unpack_bits(packed.meta, 2)[:, : k // 2]  # [N, K/2]
    cols = 4 * (torch.arange(k // 2, device=idx.device) // 2) + idx
    dense = torch.zeros(n, k, dtype=packed.dtype, device=packed.device)
    dense.scatter_(1, cols, packed.values)  # pack never emits two equal indices in a group
    return dense


# --------------------------------------------------------------------------------------------------
# Bitmap (unstructured)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackedBitmap(_PackedTensors):
    """An unstructured sparse weight as a bitmap plus the kept values compacted row-major.

    bitmap:  [N, ceil(K/32)] int32; weight (n, k) is kept iff bit ``k % 32`` of ``bitmap[n, k // 32]``.
    values:  [nnz] kept values, row by row, increasing k within a row (dtype of the weight). ``pack_bitmap``
             and ``to`` store it as a view of a buffer one (zero) element longer, so a GPU kernel may load one
             element past the last value (``values_have_tail``; the M = 1 Triton kernel relies on it).
    row_ptr: [N + 1] int64; row n's values are ``values[row_ptr[n]:row_ptr[n + 1]]``.
    shape:   (N, K) of the dense weight.
    word_offsets: [N, ceil(K/32)] int16, the number of kept values of row n before word w (an unsigned
             16-bit count stored as int16: read it as ``offset & 0xFFFF``; K <= 65536). Kept weight (n, k)
             is ``values[row_ptr[n] + offset[n, k // 32] + popcount(bitmap[n, k // 32] & (2**(k % 32) - 1))]``.
             None (hand-built objects) is filled in by ``bitmap_word_offsets`` where a kernel needs it.
    """

    bitmap: torch.Tensor
    values: torch.Tensor
    row_ptr: torch.Tensor
    shape: tuple[int, int]
    word_offsets: torch.Tensor | None = None

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def density(self) -> float:
        """Fraction of kept weights (1 - sparsity)."""
        n, k = self.shape
        return self.nnz / max(1, n * k)

    def to(self, device: torch.device | str) -> PackedBitmap:
        moved = super().to(device)  # a copy of the values to another device loses their tail: give it back
        return moved if values_have_tail(moved.values) else replace(moved, values=_with_tail(moved.values))


def pack_bitmap(weight: torch.Tensor, mask: torch.Tensor | None = None) -> PackedBitmap:
    """Pack ``weight * mask`` into the bitmap format (any K, any sparsity pattern).

    weight: [N, K] fp16/bf16/fp32. mask: [N, K] bool, or None for "the nonzeros of weight".
    Kept entries whose value is 0 are stored as explicit zeros (the bitmap is the mask).
    """
    _check_weight(weight)
    n, k = weight.shape
    keep = _check_mask(mask, weight)
    values = _with_tail(weight[keep])  # boolean indexing is row-major: row by row, increasing k
    counts = keep.sum(dim=1, dtype=torch.int64)
    row_ptr = torch.zeros(n + 1, dtype=torch.int64, device=weight.device)
    row_ptr[1:] = counts.cumsum(0)
    if k > _MAX_BITMAP_K:
        raise ValueError(f"bitmap packing stores 16-bit word offsets: in_features must be <= {_MAX_BITMAP_K}, got {k}")
    pad = (-k) % _BITS_PER_WORD
    bits = torch.nn.functional.pad(keep.to(torch.int64), (0, pad))
    bitmap = _pack_bits(bits, 1).contiguous()
    return PackedBitmap(bitmap, values, row_ptr, (n, k), bitmap_word_offsets(bitmap))


def _with_tail(values: torch.Tensor) -> torch.Tensor:
    """`values` (1-D) as a view of a buffer one zero element longer (see ``values_have_tail``)."""
    buf = torch.zeros(values.numel() + 1, dtype=values.dtype, device=values.device)
    buf[:-1] = values.reshape(-1)
    return buf[:-1]


def values_have_tail(values: torch.Tensor) -> bool:
    """True when the element after the last of `values` (contiguous) lies in its storage, so reading it is safe."""
    end = (values.storage_offset() + values.numel() + 1) * values.element_size()
    return values.is_contiguous() and values.untyped_storage().nbytes() >= end


def bitmap_word_offsets(bitmap: torch.Tensor) -> torch.Tensor:
    """[N, W] int32 bitmap -> [N, W] int16: kept values of the row before each word (unsigned 16-bit)."""
    counts = _unpack_bits(bitmap, 1).reshape(bitmap.shape[0], bitmap.shape[1], _BITS_PER_WORD).sum(dim=-1)
    offsets = counts.cumsum(dim=1) - counts  # exclusive prefix sum, < 65536 because K <= 65536
    offsets = torch.where(offsets >= 2**15, offsets - 2**16, offsets)  # uint16 -> int16 bit pattern
    return offsets.to(torch.int16).contiguous()


def unpack_bitmap(packed: PackedBitmap) -> torch.Tensor:
    """Dense [N, K] weight with zeros at the dropped positions."""
    n, k = packed.shape
    keep = _unpack_bits(packed.bitmap, 1)[:, :k].to(torch.bool)
    dense = torch.zeros(n, k, dtype=packed.dtype, device=packed.device)
    dense[keep] = packed.values
    return dense


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# --------------------------------------------------------------------------------------------------
# Values + one-byte columns (unstructured, GPU)
# --------------------------------------------------------------------------------------------------

COLS_TILE = 256  # inputs per column tile: a one-byte column
_COLS_PAD = 8  # entries per run are padded to a multiple of this (16-byte value vectors, 8-byte column vectors)


@dataclass(frozen=True)
class PackedCols(_PackedTensors):
    """An unstructured sparse weight as, per (row, 256-input tile), its kept values and one-byte columns.

    values:  [E] kept values; run (n, t) = ``values[run_ptr[n * T + t]:run_ptr[n * T + t + 1]]`` holds the
             kept weights of row n in inputs [256 t, 256 t + 256) in increasing input order, then zero-valued
             padding entries up to a multiple of 8 (T = ceil(K / 256) tiles; runs are row-major, so each
             run starts at a multiple of 8 entries).
    cols:    [E] uint8, the input of each entry within its tile (padding entries: 0).
    run_ptr: [N * T + 1] int32 run starts (E < 2**31).
    shape:   (N, K) of the dense weight.
    nnz:     kept weights (padding excluded).
    """

    values: torch.Tensor
    cols: torch.Tensor
    run_ptr: torch.Tensor
    shape: tuple[int, int]
    nnz: int

    @property
    def tiles(self) -> int:
        return -(-self.shape[1] // COLS_TILE)



def pack_cols(weight: torch.Tensor, mask: torch.Tensor | None = None) -> PackedCols:
    """Pack ``weight * mask`` into the values + one-byte column format (any K, any pattern).

    weight: [N, K] fp16/bf16/fp32. mask: [N, K] bool, or None for "the nonzeros of weight". Kept entries
    whose value is 0 are stored as explicit zeros.
    """
    _check_weight(weight)
    n, k = weight.shape
    keep = _check_mask(mask, weight)
    tiles = -(-k // COLS_TILE)
    pad_k = tiles * COLS_TILE - k
    keep_t = torch.nn.functional.pad(keep, (0, pad_k)).reshape(n * tiles, COLS_TILE)
    w_t = torch.nn.functional.pad(weight, (0, pad_k)).reshape(n * tiles, COLS_TILE)
    counts = keep_t.sum(dim=1, dtype=torch.int64)  # [N * T] kept per run
    padded = (counts + _COLS_PAD - 1) // _COLS_PAD * _COLS_PAD
    run_ptr = torch.zeros(n * tiles + 1, dtype=torch.int64, device=weight.device)
    run_ptr[1:] = padded.cumsum(0)
    total = int(run_ptr[-1])
    if total >= 2**31:
        raise ValueError(f"pack_cols stores int32 run starts: {total} entries do not fit")
    # entry slot of each kept weight: its run's start + its rank in the run
    rank = keep_t.to(torch.int64).cumsum(dim=1) - 1
    slot = (run_ptr[:-1, None] + rank)[keep_t]
    values = torch.zeros(total, dtype=weight.dtype, device=weight.device)
    cols = torch.zeros(total, dtype=torch.uint8, device=weight.device)
    col_idx = torch.arange(COLS_TILE, device=weight.device).expand(n * tiles, COLS_TILE)
    values[slot] = w_t[keep_t]
    cols[slot] = col_idx[keep_t].to(torch.uint8)
    return PackedCols(values, cols, run_ptr.to(torch.int32), (n, k), int(keep.sum()))


def unpack_cols(packed: PackedCols) -> torch.Tensor:
    """Dense [N, K] weight with zeros at the dropped positions."""
    n, k = packed.shape
    tiles = packed.tiles
    starts = packed.run_ptr.to(torch.int64)
    lengths = starts[1:] - starts[:-1]  # [N * T] padded run lengths
    run = torch.repeat_interleave(torch.arange(n * tiles, device=packed.device), lengths)  # run of each entry
    flat = run * COLS_TILE + packed.cols.to(torch.int64)  # index in the tile-padded [N, T * 256] weight
    dense = torch.zeros(n * tiles * COLS_TILE, dtype=packed.dtype, device=packed.device)
    # a run's kept weights come first in increasing column order, so only its first entry can be a kept
    # weight at column 0: padding is column 0 past the first entry
    pos = torch.arange(flat.numel(), device=packed.device) - starts[:-1][run]
    kept = (packed.cols != 0) | (pos == 0)
    dense[flat[kept]] = packed.values[kept]
    return dense.reshape(n, tiles * COLS_TILE)[:, :k].contiguous()
