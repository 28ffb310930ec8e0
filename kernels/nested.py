"""Nested-tier shared-values format: one copy of the values serves every nested unstructured tier.

Tiers are ordered **sparsest first**: ``masks[0]`` keeps the fewest weights and every mask is a subset of
the next (``masks[k] <= masks[k + 1]``), as the elastic checkpoint's unstructured tiers are (a weight kept
at 90% sparsity is kept at 80%, ..., 30%; from drop levels: ``masks = [drop_level > p for p in
(90, 80, 70, 60, 50, 40, 30)]``). The *level* of a weight is the index of the first tier that keeps it
(``T`` = never kept, T = number of tiers); tier k keeps exactly the weights of level <= k.

Layout. Each row is cut into column tiles of ``tile`` inputs (32, 64 or 128). Within a (row, tile) the
kept values of the densest tier are stored **level-major, then by column**, so the values of tier k are a
prefix of every (row, tile) run. Two index structures say where a stored value goes; either or both are
kept (``index``):

* ``cols`` ("cols" index): the in-tile column of each value, uint8, parallel to ``values``; plus
  ``level_ends[k, n, t]``, the prefix length of tier k in tile (n, t). A tier-k kernel reads only the
  prefix of values and cols of each tile and its own ``level_ends[k]`` slice: 3 bytes per kept weight.
* ``planes`` ("levels" index): the level code of every position as P = bit_length(T) bit planes
  (3 bits for the 7 tiers 30..90%). A tier-k kernel reads all planes (P / 8 bytes/weight), and ranks a
  kept weight inside its level segment in registers (``triton_nested``), then reads the value prefix:
  2 bytes per kept weight + P / 8 per weight.

Alignment (``align``, default 4). Each (row, tile) run is padded with entries (value +0.0, column 0) to a
multiple of ``align`` entries, so every run starts on an ``align``-entry boundary (``tile`` is a multiple
of ``align``, so a padded run is still at most ``tile`` entries and the 16-bit tile offsets still fit).
The cols kernel then reads each tier prefix rounded up to ``align`` entries with loads of ``align``
values (8 bytes for fp16) and ``align`` columns (4 bytes) at aligned addresses, which Triton's pipeliner
turns into cp.async copies (it needs >= 4-byte loads of known alignment); the entries past the tier's
prefix are zeroed in registers. ``align=1`` is the unpadded layout (1-2 byte loads at any address, no
cp.async).

Both also read ``row_ptr`` and the per-(row, tile) value offset. Bytes per weight (fp16 values, tile 128,
T = 7 so P = 3, density d_k of tier k; dense fp16 is 2), for ``align=1``:

* cols:   3 d_k + 2/128 (tile offsets) + 1/128 (the tier's level_ends) + 8/K (row_ptr)
* levels: 2 d_k + 3/8 (planes) + 2/128 + 8/K
* a per-tier ``PackedBitmap`` for comparison: 2 d_k + 1/8 + 1/16 + 8/K

With ``align=A`` the cols read rounds each tile's prefix up to A entries (on average (A - 1) / 2 more
entries a tile for a random prefix, 3 bytes each: +0.035 bytes/weight measured at A = 4, tile 128, every
tier) and the stored values and columns include each run's padding (+0.035 stored); the levels read is
unchanged (it reads only kept values).

cols is cheaper below d ~ 0.37 (tiers 70-90%), levels above (30-60%), so ``index="both"`` (default) stores
both and the kernel reads the cheaper one per tier (``index_for``). Storage for all 7 tiers with both is
about 2.55 bytes/weight at ``align=1`` (2.58 at 4; levels only ~1.8, below one dense fp16 copy) against
~6.9 for 7 separate bitmaps; docs/benchmarks.md ("Nested-tier format") has the measured table.

Why not only the uint8 column index (one structure, simplest kernel): at 30% sparsity it reads 2.1
bytes/weight, more than dense fp16. Why not only the level map: at 90% it reads 0.59 vs 0.33 (0.36 with
the 4-entry aligned runs).

Values. The format stores ONE set of values, ``W`` restricted to each tier's mask: it serves tiers whose
weight is ``W * M_k`` (no per-tier merged LoRA; in the engine's unmasked LoRA mode the delta runs beside
the sparse base). Tiers whose merged values differ (masked LoRA, EPTS) need one pack per tier. Packing
copies values exactly: ``unpack_nested(pack_nested(W, masks), k) == where(masks[k], W, +0.0)`` bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .formats import _check_mask, _check_weight, _nbytes, _pack_bits, _PackedTensors, _unpack_bits
from .reference import check_linear_inputs

__all__ = [
    "NestedIndex",
    "PackedNested",
    "linear_nested_reference",
    "pack_nested",
    "unpack_nested",
]

NestedIndex = Literal["both", "cols", "levels"]
TILES = (32, 64, 128)  # in-tile columns, prefix lengths and ranks all fit 8 bits (<= 128, see triton_nested)
# The levels kernel packs per-level counts into 8-bit fields of one int64: at most 8 levels (tiers).
MAX_TIERS = 8
# Tile offsets are 16-bit counts of a row's entries before a tile (padded runs are at most `tile` entries), so
# a row holds at most 65536 inputs.
_MAX_K = 65536
ALIGNS = (1, 2, 4, 8)  # entries each (row, tile) run is padded to a multiple of
DEFAULT_ALIGN = 4  # 8-byte fp16 value loads and 4-byte column loads: the smallest that cp.async takes


@dataclass(frozen=True)
class PackedNested(_PackedTensors):
    """T nested unstructured tiers of one weight W [N, K] sharing one copy of the values.

    values:       [E] kept values of the densest tier (T - 1), row by row, tile by tile, and within a
                  (row, tile) by level, then column (dtype of the weight), each (row, tile) run followed by
                  +0.0 padding up to a multiple of ``align`` entries. E = ``tier_nnz[-1]`` + padding.
    row_ptr:      [N + 1] int64; row n's entries are ``values[row_ptr[n]:row_ptr[n + 1]]`` (multiples of
                  ``align``).
    tile_offsets: [N, ceil(K / tile)] int16, entries (padding included) of row n before tile t (unsigned
                  16-bit: read it as ``offset & 0xFFFF``). Tile (n, t) starts at
                  ``row_ptr[n] + tile_offsets[n, t]``, a multiple of ``align``.
    cols:         [E] uint8 in-tile column of each value (input ``t * tile + cols[i]``; padding: 0), or None.
    level_ends:   [T, N, ceil(K / tile)] uint8, values of tile (n, t) with level <= k: tier k reads the
                  first ``level_ends[k, n, t]`` values of the tile. None exactly when cols is None.
    planes:       [N, ceil(K / tile) * tile / 32, P] int32, bit c % 32 of ``planes[n, c // 32, p]`` is bit p
                  of the level code of input c (T = never kept, also for the padding past K), or None.
    shape:        (N, K) of the dense weight.
    tile:         inputs per column tile.
    tier_nnz:     kept weights per tier, sparsest first (non-decreasing).
    align:        entries each (row, tile) run is padded to a multiple of (1 = no padding).
    """

    values: torch.Tensor
    row_ptr: torch.Tensor
    tile_offsets: torch.Tensor
    cols: torch.Tensor | None
    level_ends: torch.Tensor | None
    planes: torch.Tensor | None
    shape: tuple[int, int]
    tile: int
    tier_nnz: tuple[int, ...]
    align: int = 1

    @property
    def num_tiers(self) -> int:
        return len(self.tier_nnz)

    @property
    def num_planes(self) -> int:
        """Bits of a level code: codes 0..T (T = never kept)."""
        return self.num_tiers.bit_length()

    @property
    def indexes(self) -> tuple[Literal["cols", "levels"], ...]:
        """The index structures stored: "cols", "levels" or both."""
        return tuple(name for name, t in (("cols", self.cols), ("levels", self.planes)) if t is not None)

    def check_tier(self, tier: int) -> None:
        """Raise ValueError unless ``tier`` is an index into the T tiers (0 = sparsest)."""
        if isinstance(tier, bool) or not isinstance(tier, int) or not 0 <= tier < self.num_tiers:
            raise ValueError(f"tier must be an int in [0, {self.num_tiers}) (0 = sparsest), got {tier!r}")

    def density(self, tier: int) -> float:
        """Fraction of weights kept by ``tier`` (1 - sparsity)."""
        self.check_tier(tier)
        n, k = self.shape
        return self.tier_nnz[tier] / max(1, n * k)

    @property
    def stored_bytes_per_weight(self) -> float:
        """``nbytes`` (all tiers together) per dense weight."""
        n, k = self.shape
        return self.nbytes / max(1, n * k)

    def read_bytes(self, tier: int, index: Literal["cols", "levels"] | None = None) -> int:
        """Bytes a tier-``tier`` matmul reads from the packed weight with ``index`` (None: ``index_for``)."""
        self.check_tier(tier)
        index = self.index_for(tier) if index is None else index
        if index not in self.indexes:
            raise ValueError(f"index {index!r} is not stored in this pack (stored: {self.indexes})")
        nnz = self.tier_nnz[tier]
        tables = _nbytes(self.row_ptr) + _nbytes(self.tile_offsets)
        if index == "cols":
            # the kernel reads each tile's prefix rounded up to `align` entries
            a = self.align
            entries = int(((self.level_ends[tier].to(torch.int64) + a - 1) // a).sum()) * a
            return (tables + entries * (self.values.element_size() + self.cols.element_size())
                    + _nbytes(self.level_ends[tier]))
        return tables + nnz * self.values.element_size() + _nbytes(self.planes)

    def bytes_per_weight(self, tier: int, index: Literal["cols", "levels"] | None = None) -> float:
        """``read_bytes`` per dense weight: what bounds a memory-bound (decode) matmul of that tier."""
        n, k = self.shape
        return self.read_bytes(tier, index) / max(1, n * k)

    def index_for(self, tier: int) -> Literal["cols", "levels"]:
        """The stored index a tier-``tier`` kernel reads fewer bytes with."""
        if len(self.indexes) == 1:
            return self.indexes[0]
        return min(self.indexes, key=lambda name: self.read_bytes(tier, name))



def _check_nested_masks(
    masks: Sequence[torch.Tensor] | torch.Tensor, weight: torch.Tensor
) -> list[torch.Tensor]:
    """Bool masks [N, K], sparsest first; ValueError when empty, too many, misshaped or not nested."""
    if isinstance(masks, torch.Tensor):
        if masks.dim() != 3:
            raise ValueError(f"masks as one tensor must be [T, N, K], got shape {tuple(masks.shape)}")
        masks = list(masks.unbind(0))
    if not 1 <= len(masks) <= MAX_TIERS:
        raise ValueError(f"need 1 to {MAX_TIERS} tier masks, got {len(masks)}")
    if any(m is None for m in masks):
        raise ValueError("every tier needs an explicit bool mask (None is not allowed)")
    keeps = [_check_mask(m, weight) for m in masks]
    for i in range(len(keeps) - 1):
        bad = int((keeps[i] & ~keeps[i + 1]).sum())
        if bad:
            hint = ""
            if all(not (keeps[j + 1] & ~keeps[j]).any() for j in range(len(keeps) - 1)):
                hint = "; they are nested densest first: reverse the list"
            raise ValueError(
                f"masks are not nested: mask {i} keeps {bad} weights that mask {i + 1} drops "
                f"(pass masks sparsest first, each a subset of the next){hint}"
            )
    return keeps


def _tile_order(code: torch.Tensor, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Storage order of the tiles: level codes [N, tiles * tile] -> order, sorted codes ([N, tiles, tile]).

    order[n, t, j] is the in-tile column of the tile's j-th slot: by level, then column (keys are unique).
    """
    n = code.shape[0]
    lev = code.reshape(n, -1, tile)
    key = lev * tile + torch.arange(tile, device=code.device)
    order = key.argsort(dim=-1)
    return order, lev.gather(-1, order)


def pack_nested(
    weight: torch.Tensor,
    masks: Sequence[torch.Tensor] | torch.Tensor,
    *,
    tile: int = 128,
    index: NestedIndex = "both",
    align: int = DEFAULT_ALIGN,
) -> PackedNested:
    """Pack T nested tiers of ``weight`` into one shared-values ``PackedNested``.

    weight: [N, K] fp16/bf16/fp32, K <= 65536. masks: T bool [N, K] masks (or one [T, N, K] tensor),
    sparsest first, each a subset of the next, 1 <= T <= 8. tile: 32, 64 or 128 inputs per column tile.
    index: "cols", "levels" or "both" (see the module doc). align: 1, 2, 4 or 8, each (row, tile) run is
    padded to a multiple of it (module doc). Kept entries with value 0 are stored.
    Raises ValueError on bad shapes, dtypes, tile, index or align, and when the masks are not nested.
    """
    _check_weight(weight)
    n, k = weight.shape
    if tile not in TILES:
        raise ValueError(f"tile must be one of {TILES}, got {tile}")
    if isinstance(align, bool) or align not in ALIGNS:
        raise ValueError(f"align must be one of {ALIGNS}, got {align!r}")
    if index not in ("both", "cols", "levels"):
        raise ValueError(f"index must be 'both', 'cols' or 'levels', got {index!r}")
    if k > _MAX_K:
        raise ValueError(f"nested packing stores 16-bit tile offsets: in_features must be <= {_MAX_K}, "
                         f"got {k}")
    keeps = _check_nested_masks(masks, weight)
    num_tiers = len(keeps)
    n_tiles = -(-k // tile)
    pad = n_tiles * tile - k
    # level = first tier keeping the weight = T - (tiers keeping it), since the masks are nested
    code = num_tiers - torch.stack(keeps).sum(dim=0, dtype=torch.int64)  # [N, K] in 0..T
    code = F.pad(code, (0, pad), value=num_tiers)  # [N, tiles * tile]: padding is never kept
    order, lev_sorted = _tile_order(code, tile)
    stored = lev_sorted < num_tiers  # [N, tiles, tile]: a prefix of every tile
    counts = torch.stack([(lev_sorted == lv).sum(dim=-1) for lv in range(num_tiers)])  # [T, N, tiles]
    ends = counts.cumsum(dim=0)  # [T, N, tiles]: values of level <= k per tile
    per_tile = ends[-1]  # [N, tiles] kept values
    run_len = (per_tile + align - 1) // align * align  # [N, tiles] entries stored, padding included
    before = run_len.cumsum(dim=1) - run_len  # exclusive, < 65536: runs <= tile entries, K <= 65536
    offsets = torch.where(before >= 2**15, before - 2**16, before).to(torch.int16).contiguous()
    row_ptr = torch.zeros(n + 1, dtype=torch.int64, device=weight.device)
    row_ptr[1:] = run_len.sum(dim=1).cumsum(0)
    # entry index of every stored slot: run start + rank in the run (padding entries stay +0.0 / column 0)
    first = row_ptr[:-1, None] + before  # [N, tiles] run starts
    slot = (first[:, :, None] + torch.arange(tile, device=weight.device))[stored]
    kept = F.pad(weight, (0, pad)).reshape(n, n_tiles, tile).gather(-1, order)[stored]
    total = int(row_ptr[-1])
    values = torch.zeros(total, dtype=weight.dtype, device=weight.device)
    values[slot] = kept
    cols = level_ends = planes = None
    if index in ("both", "cols"):
        cols = torch.zeros(total, dtype=torch.uint8, device=weight.device)
        cols[slot] = order[stored].to(torch.uint8)
        level_ends = ends.to(torch.uint8).contiguous()  # <= tile <= 128
    if index in ("both", "levels"):
        bits = [(code >> p) & 1 for p in range(num_tiers.bit_length())]
        planes = torch.stack([_pack_bits(b, 1) for b in bits], dim=-1).contiguous()  # [N, words, P]
    tier_nnz = tuple(int(v) for v in ends.sum(dim=(1, 2)).tolist())
    return PackedNested(values, row_ptr, offsets, cols, level_ends, planes, (n, k), tile, tier_nnz, align)


def _entry_ranks(p: PackedNested, per_tile: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(run, rank) of every stored entry: its (row, tile) run as n * tiles + t and its slot in that run.

    per_tile: [N, tiles] kept values of each run (the stored run is that rounded up to ``align``)."""
    a = p.align
    run_len = ((per_tile.to(torch.int64) + a - 1) // a * a).flatten()  # [N * tiles]
    run = torch.repeat_interleave(torch.arange(run_len.numel(), device=p.device), run_len)  # [E]
    first = p.row_ptr[:-1, None] + (p.tile_offsets.to(torch.int64) & 0xFFFF)  # [N, tiles] run starts
    rank = torch.arange(p.values.numel(), device=p.device) - first.flatten()[run]
    return run, rank


def _unpack_cols(p: PackedNested, tier: int) -> torch.Tensor:
    """Dense [N, tiles * tile] of ``tier`` from the cols index."""
    n, _ = p.shape
    ends = p.level_ends.to(torch.int64)  # [T, N, tiles]
    n_tiles = ends.shape[2]
    run, rank = _entry_ranks(p, ends[-1])
    keep = rank < ends[tier].flatten()[run]  # the tier's prefix of every run (never padding)
    flat = run * p.tile + p.cols.to(torch.int64)  # (n * tiles + t) * tile + col = n * padded K + input
    dense = torch.zeros(n * n_tiles * p.tile, dtype=p.dtype, device=p.device)
    dense[flat[keep]] = p.values[keep]
    return dense.reshape(n, -1)


def _unpack_levels(p: PackedNested, tier: int) -> torch.Tensor:
    """Dense [N, tiles * tile] of ``tier`` from the level planes."""
    n, _ = p.shape
    code = sum(_unpack_bits(p.planes[:, :, b].contiguous(), 1) << b for b in range(p.planes.shape[2]))
    order, lev_sorted = _tile_order(code, p.tile)
    stored = lev_sorted < p.num_tiers
    slots = torch.zeros(lev_sorted.shape, dtype=p.dtype, device=p.device)
    per_tile = stored.sum(dim=-1)  # [N, tiles]
    run, rank = _entry_ranks(p, per_tile)
    slots[stored] = p.values[rank < per_tile.flatten()[run]]  # padding entries skipped
    slots = torch.where(lev_sorted <= tier, slots, torch.zeros_like(slots))
    return torch.zeros_like(slots).scatter_(-1, order, slots).reshape(n, -1)


def unpack_nested(packed: PackedNested, tier: int) -> torch.Tensor:
    """Dense [N, K] weight of ``tier`` (0 = sparsest) with +0.0 at the dropped positions."""
    packed.check_tier(tier)
    dense = _unpack_cols(packed, tier) if packed.cols is not None else _unpack_levels(packed, tier)
    return dense[:, : packed.shape[1]].contiguous()


def linear_nested_reference(
    x: torch.Tensor, packed: PackedNested, tier: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y = x @ W_tier.T + bias for a nested packed W. x: [..., K] -> y: [..., N] (dtype of x)."""
    check_linear_inputs(x, packed, bias)
    w = unpack_nested(packed, tier)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
