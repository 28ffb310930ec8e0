"""Triton nested-tier sparse linear: y = x @ W_k.T (+ bias) with W in the ``PackedNested`` format.

One launch serves any tier k; the tier is a runtime argument and only the prefix of each (row, tile)
value run is read. A program owns BLOCK_N rows and all rows of x (up to 8; more rows tile the grid, each
block re-reading the weight from L2), walks its split of K (split-K over the format tiles, grid axis 1,
``_triton_util.store_split_k``) one format tile at a time and accumulates fp32 partial products in a
register tile reduced once after the loop. Two kernels, one per index (``PackedNested.index_for`` picks the
one that reads fewer bytes):

* ``cols`` (sparse tiers): per tile, the prefix length ``level_ends[k, n, t]`` of each row, then
  BLOCK_J values and their uint8 columns per step while any row of the block has some left; x is gathered
  at ``t * tile + col`` (x is small and stays in L1/L2; ``_triton_util.gather_load``). Work scales with the
  tier's kept weights. Runs start on ``packed.align`` entries (``nested`` module doc): the loop reads each
  prefix rounded up to ALIGN entries (masks constant over ALIGN entries), so with ALIGN = 4 the values
  (8 bytes) and columns (4 bytes) are cp.async copies of ``tl.range(num_stages)``; the entries past the
  prefix (the next levels' values or padding) are zeroed in registers. ALIGN = 1 (unpadded packs) reads
  1-2 byte loads, which Triton does not pipeline.
* ``levels`` (dense tiers): per tile, the P level-code planes of each row ([BLOCK_N, tile / 32, P] words)
  are expanded to codes; a weight is kept iff code <= k. Its slot in the tile's level-major run is
  ``start[level] + (same-level weights before it)``. Both counts come from one scan: each kept weight
  contributes ``1 << (8 * level)`` to an int64, so an inclusive ``cumsum`` along the tile holds all
  per-level running counts in 8-bit fields (<= tile <= 128, no carries); the per-level totals times
  0x0101010101010101, shifted one field, are the exclusive per-level starts. The dense [BLOCK_N, tile]
  tile then feeds fp32 FMAs; the plane words and the x tile are cp.async copies (``tl.range(num_stages)``).

GEMV only (decode): there is no tensor-core path, ``path="dot"`` is rejected. Reference:
``nested.linear_nested_reference``. This module imports triton: ``dispatch`` imports it lazily.
"""

from __future__ import annotations

from typing import Literal

import torch
import triton
import triton.language as tl

from ._launch import (
    KernelConfig,
    KernelPath,
    check_triton_device,
    fill_bias,
    flatten_rows,
    gemv_output,
    interpreter_enabled,
)
from ._triton_util import autotune_bench, gather_load, launch_gemv, split_k_range, store_split_k
from .nested import PackedNested
from .reference import check_linear_inputs

__all__ = ["linear_nested_triton"]

# Autotune candidates: (BLOCK_N, BLOCK_J, num_warps) for cols, (BLOCK_N, num_warps) for levels (the K step
# is the format tile). Small row blocks keep N / BLOCK_N >= 256 programs at N = 4096. Cols tiles hold 8
# entries a thread (BLOCK_N * BLOCK_J = 256 * num_warps): two aligned 4-entry vectors, each an 8-byte value
# and a 4-byte column cp.async (fewer entries a thread make the column loads 1-2 bytes again).
COLS_SHAPES = [(8, 32, 1), (4, 64, 1), (16, 32, 2), (8, 64, 2), (16, 64, 4)]
LEVELS_SHAPES = [(2, 4), (4, 4), (8, 4), (16, 8)]  # (16, 4) spills at BLOCK_M = 8 (ptxas, sm_90)
LEVELS_STAGES = 3  # the levels loop's tl.range(num_stages): cp.async of the plane words and the x tile
COLS_STAGES = 2  # the cols inner loop's tl.range(num_stages): cp.async of values and columns (ALIGN >= 4)


def _cols_configs() -> list[triton.Config]:
    if interpreter_enabled():  # multi-config autotune crashes in the interpreter: one small config
        return [triton.Config({"BLOCK_N": 16, "BLOCK_J": 32, "NUM_STAGES": 2}, num_warps=4)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_J": bj, "NUM_STAGES": COLS_STAGES}, num_warps=w,
                          num_stages=COLS_STAGES) for bn, bj, w in COLS_SHAPES]


def _levels_configs() -> list[triton.Config]:
    if interpreter_enabled():
        return [triton.Config({"BLOCK_N": 16, "NUM_STAGES": 2}, num_warps=4)]
    return [triton.Config({"BLOCK_N": bn, "NUM_STAGES": LEVELS_STAGES}, num_warps=w, num_stages=LEVELS_STAGES)
            for bn, w in LEVELS_SHAPES]


@triton.jit
def _gemv_cols_kernel(
    x_ptr, values_ptr, cols_ptr, row_ptr, tile_off_ptr, ends_ptr, bias_ptr, y_ptr, ws_ptr, lock_ptr,
    M, N, K, stride_xm, stride_ym, TIER,
    HAS_BIAS: tl.constexpr, TILE: tl.constexpr, HW_LOAD: tl.constexpr, X_BITS: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    # ends_ptr is level_ends[TIER]: [N, tiles] prefix lengths of this tier (TIER only keys the autotuning).
    # Split-K over the format tiles (grid axis 1, _triton_util.store_split_k); 32-bit value indices (the
    # launcher checks the value count); x gathered without a mask (rows past M read row M - 1, masked
    # entries column 0) by _triton_util.gather_load.
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    SPLIT_K = tl.num_programs(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    n_tiles = tl.cdiv(K, TILE)
    row_start = tl.load(row_ptr + offs_n, mask=n_mask, other=0).to(tl.int32)  # [BN]
    tile_rows = offs_n * n_tiles
    x_rows = x_ptr + (tl.minimum(offs_m, M - 1) * stride_xm)[:, None, None]  # [BM, 1, 1]
    acc3 = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_J), dtype=tl.float32)
    t_lo, t_hi = split_k_range(n_tiles, pid_s, SPLIT_K, 1)  # format tiles of this split
    for t in range(t_lo, t_hi):
        off = tl.load(tile_off_ptr + tile_rows + t, mask=n_mask, other=0).to(tl.int32) & 0xFFFF
        length = tl.load(ends_ptr + tile_rows + t, mask=n_mask, other=0).to(tl.int32)  # [BN] prefix lengths
        start = tl.multiple_of(row_start + off, ALIGN)[:, None]  # [BN, 1]: runs start on ALIGN entries
        # the prefix rounded up to ALIGN entries: stays inside the (padded) run, masks constant over ALIGN
        length_a = tl.multiple_of((length + (ALIGN - 1)) // ALIGN * ALIGN, ALIGN)
        for j0 in tl.range(0, tl.max(length_a, axis=0), BLOCK_J, num_stages=NUM_STAGES):
            j = j0 + tl.arange(0, BLOCK_J)
            j_mask = j[None, :] < length_a[:, None]  # [BN, BJ]
            v = tl.load(values_ptr + start + j[None, :], mask=j_mask, other=0.0)
            col = tl.load(cols_ptr + start + j[None, :], mask=j_mask, other=0).to(tl.int32)
            v = tl.where(j[None, :] < length[:, None], v, 0.0)  # past the tier's prefix: next levels, padding
            xv = gather_load(x_rows + (t * TILE + col)[None, :, :], HW_LOAD, X_BITS)
            acc3 += v.to(tl.float32)[None, :, :] * xv.to(tl.float32)  # [BM, BN, BJ]
    acc = tl.sum(acc3, axis=2)  # [BLOCK_M, BLOCK_N]
    store_split_k(acc, y_ptr, ws_ptr, lock_ptr, bias_ptr, offs_m, offs_n, M, N, stride_ym, pid_s,
                  pid_m * tl.num_programs(0) + pid_n, SPLIT_K, HAS_BIAS)


@triton.jit
def _expand_levels(planes_ptr, values_ptr, tile_start, offs_n, t, tier, N, n_words,
                   TILE: tl.constexpr, NUM_PLANES: tl.constexpr, BLOCK_N: tl.constexpr):
    """Dense tile W_tier[offs_n, t * TILE + c] as [BLOCK_N, TILE] (values dtype); tile_start: [BN] int64."""
    BW: tl.constexpr = TILE // 32
    w = t * BW + tl.arange(0, BW)
    rows = offs_n.to(tl.int64)[:, None]
    bit = tl.arange(0, 32)[None, None, :]
    code = tl.zeros((BLOCK_N, BW, 32), dtype=tl.int32)
    for p in tl.static_range(NUM_PLANES):
        # rows past N read all-ones words: code 2**P - 1 >= T, never kept
        word = tl.load(planes_ptr + (rows * n_words + w[None, :]) * NUM_PLANES + p, mask=(offs_n < N)[:, None],
                       other=-1)
        code |= ((word[:, :, None] >> bit) & 1) << p
    code = tl.reshape(code, (BLOCK_N, TILE))  # input c of the tile = bit c % 32 of word c // 32
    kept = code <= tier
    shift = (8 * tl.where(kept, code, 0)).to(tl.int64)  # 8-bit field of the weight's level
    one = tl.where(kept, tl.full((BLOCK_N, TILE), 1, dtype=tl.int64) << shift, 0)
    before = tl.cumsum(one, axis=1) - one  # per-level counts of kept weights before each input
    starts = (tl.sum(one, axis=1) * 0x0101010101010101) << 8  # [BN] field l: kept weights of level < l
    slot = ((starts[:, None] + before) >> shift) & 0xFF
    return tl.load(values_ptr + tile_start[:, None] + slot, mask=kept, other=0.0)


@triton.jit
def _gemv_levels_kernel(
    x_ptr, values_ptr, planes_ptr, row_ptr, tile_off_ptr, bias_ptr, y_ptr, ws_ptr, lock_ptr,
    M, N, K, stride_xm, stride_ym, TIER,
    HAS_BIAS: tl.constexpr, TILE: tl.constexpr, NUM_PLANES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    # Split-K over the format tiles (grid axis 1); the plane words and the x tile are cp.async copies
    # NUM_STAGES - 1 tiles ahead (tl.range(num_stages): Triton's pipeliner).
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    SPLIT_K = tl.num_programs(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    n_tiles = tl.cdiv(K, TILE)
    n_words = n_tiles * (TILE // 32)
    row_start = tl.load(row_ptr + offs_n, mask=n_mask, other=0)  # [BN] int64
    tile_rows = offs_n.to(tl.int64) * n_tiles
    acc3 = tl.zeros((BLOCK_M, BLOCK_N, TILE), dtype=tl.float32)
    t_lo, t_hi = split_k_range(n_tiles, pid_s, SPLIT_K, 1)  # format tiles of this split
    for t in tl.range(t_lo, t_hi, num_stages=NUM_STAGES):
        off = tl.load(tile_off_ptr + tile_rows + t, mask=n_mask, other=0).to(tl.int32) & 0xFFFF
        wt = _expand_levels(planes_ptr, values_ptr, row_start + off, offs_n, t, TIER, N, n_words,
                            TILE, NUM_PLANES, BLOCK_N)
        k = t * TILE + tl.arange(0, TILE)
        x_mask = (offs_m < M)[:, None] & (k < K)[None, :]
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=x_mask, other=0.0)  # [BM, TILE]
        acc3 += wt.to(tl.float32)[None, :, :] * xt.to(tl.float32)[:, None, :]
    acc = tl.sum(acc3, axis=2)  # [BLOCK_M, BLOCK_N]
    store_split_k(acc, y_ptr, ws_ptr, lock_ptr, bias_ptr, offs_m, offs_n, M, N, stride_ym, pid_s,
                  pid_m * tl.num_programs(0) + pid_n, SPLIT_K, HAS_BIAS)


# Autotuned entry points, one tuning per weight shape, row bucket (and tier for cols: its work follows the
# tier's density); the raw kernels take explicit tiles.
_gemv_cols_tuned = triton.autotune(
    configs=_cols_configs(), key=["N", "K", "BLOCK_M", "TIER"], do_bench=autotune_bench
)(_gemv_cols_kernel)
_gemv_levels_tuned = triton.autotune(
    configs=_levels_configs(), key=["N", "K", "BLOCK_M"], do_bench=autotune_bench
)(_gemv_levels_kernel)


def linear_nested_triton(
    x: torch.Tensor,
    packed: PackedNested,
    tier: int,
    bias: torch.Tensor | None = None,
    path: KernelPath = "auto",
    index: Literal["auto", "cols", "levels"] = "auto",
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """y = x @ W_tier.T + bias with the Triton nested kernels. x: [..., K] -> y: [..., N] (dtype of x).

    tier: 0 = sparsest. path: "auto" or "gemv" (the only kernel). index: "cols", "levels" or "auto"
    (``packed.index_for(tier)``). config: tile override (tests, benchmarks); block_k is BLOCK_J for cols
    and ignored for levels (the K step is the format tile).
    """
    check_linear_inputs(x, packed, bias)
    check_triton_device(x)
    packed.check_tier(tier)
    if path not in ("auto", "gemv"):
        raise ValueError(f"the nested format has only a gemv kernel: path must be 'auto' or 'gemv', "
                         f"got {path!r}")
    if index == "auto":
        index = packed.index_for(tier)
    elif index not in packed.indexes:
        raise ValueError(f"index must be 'auto' or one stored in the pack {packed.indexes}, got {index!r}")
    n, k = packed.shape
    x2 = flatten_rows(x)  # [M, K]
    m = x2.shape[0]
    y, b = gemv_output(x2, n, bias)
    if m == 0 or packed.tier_nnz[tier] == 0:
        fill_bias(y, bias)
        return y.reshape(*x.shape[:-1], n)
    rest = (m, n, k, x2.stride(0), y.stride(0), tier)
    flags = {"HAS_BIAS": bias is not None, "TILE": packed.tile}
    if index == "cols":
        if packed.values.numel() >= 2**31 or n * -(-k // packed.tile) >= 2**31:
            raise ValueError("the nested cols kernel uses 32-bit offsets: values and N * tiles must be < 2**31")
        flags.update(HW_LOAD=not interpreter_enabled(), X_BITS=8 * x.element_size(), ALIGN=packed.align)
        ends = packed.level_ends[tier]  # [N, tiles]: the only slice of level_ends this tier reads
        ptrs = (x2, packed.values, packed.cols, packed.row_ptr, packed.tile_offsets, ends, b, y)
        kernel, tuned, shapes, inner = _gemv_cols_kernel, _gemv_cols_tuned, COLS_SHAPES, "BLOCK_J"
    else:
        ptrs = (x2, packed.values, packed.planes, packed.row_ptr, packed.tile_offsets, b, y)
        kernel, tuned, shapes, inner = _gemv_levels_kernel, _gemv_levels_tuned, LEVELS_SHAPES, None
        flags["NUM_PLANES"] = packed.num_planes
    if interpreter_enabled():
        shapes = [(16, 0)]  # the one interpreter config's BLOCK_N (the K step is the format tile)
    launch_gemv(kernel, tuned, shapes, ptrs, rest, m, n, k, x.device, config, step_k=packed.tile, inner=inner,
                **flags)
    return y.reshape(*x.shape[:-1], n)
