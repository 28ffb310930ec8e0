"""Triton sparse linear for the values + one-byte column format: y = x @ W.T (+ bias), W a ``PackedCols``.

Work scales with the stored values (the format for high sparsity, >= 70-80%): a program owns BLOCK_N rows
and all rows of x up to 8, walks its split's 256-input tiles, and per tile reads each row's run (values and
one-byte columns, 8-entry aligned, so 16-byte / 8-byte vector loads) BLOCK_V entries at a time while any row
of the block has some left; x is gathered at ``256 t + col`` (x is small and stays in L1/L2), one fp32 FMA
per stored value and row of x. Split-K over the tiles (grid axis 1, ``_triton_util.store_split_k``).
GEMV only (decode); ``dispatch`` runs cuBLAS on the unpacked weight for prefill. Reference:
``formats.unpack_cols`` + ``F.linear``. This module imports triton: ``dispatch`` imports it lazily.
"""

from __future__ import annotations

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
from .formats import COLS_TILE, PackedCols
from .reference import check_linear_inputs

__all__ = ["linear_cols_triton", "unpack_cols_triton"]

# (BLOCK_N, BLOCK_V, num_warps): BLOCK_V entries of each of BLOCK_N rows per inner step
COLS_SHAPES = [(32, 128, 4), (16, 128, 4), (32, 64, 4), (8, 128, 2)]
COLS_STAGES = 3


def _configs() -> list[triton.Config]:
    if interpreter_enabled():  # multi-config autotune crashes in the interpreter: one small config
        return [triton.Config({"BLOCK_N": 16, "BLOCK_V": 16, "NUM_STAGES": 2}, num_warps=4)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "NUM_STAGES": COLS_STAGES}, num_warps=w,
                          num_stages=COLS_STAGES) for bn, bv, w in COLS_SHAPES]


@triton.jit
def _gemv_cols_kernel(
    x_ptr, values_ptr, cols_ptr, run_ptr, bias_ptr, y_ptr, ws_ptr, lock_ptr,
    M, N, K, stride_xm, stride_ym,
    HAS_BIAS: tl.constexpr, HW_LOAD: tl.constexpr, X_BITS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    SPLIT_K = tl.num_programs(1)
    TILE: tl.constexpr = 256
    n_tiles = tl.cdiv(K, TILE)
    t_lo, t_hi = split_k_range(n_tiles, pid_s, SPLIT_K, 1)  # format tiles of this split
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    # rows of x past M read row M - 1 (their sums are never stored): the x gathers need no mask
    x_rows = x_ptr + (tl.minimum(offs_m, M - 1) * stride_xm)[:, None, None]  # [BM, 1, 1]
    v = tl.arange(0, BLOCK_V)
    acc3 = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_V), dtype=tl.float32)
    for t in range(t_lo, t_hi):
        r = offs_n * n_tiles + t
        start = tl.multiple_of(tl.load(run_ptr + r, mask=n_mask, other=0), 8)  # runs start on 8 entries
        end = tl.multiple_of(tl.load(run_ptr + r + 1, mask=n_mask, other=0), 8)
        length = end - start  # [BN], a multiple of 8
        x_tile = x_rows + t * TILE
        # values (16-byte vectors) and columns (8-byte vectors): cp.async, NUM_STAGES - 1 steps ahead
        for j0 in tl.range(0, tl.max(length, axis=0), BLOCK_V, num_stages=NUM_STAGES):
            j = j0 + v
            jm = j[None, :] < length[:, None]  # [BN, BV], constant over each 8-entry vector
            e = start[:, None] + j[None, :]
            val = tl.load(values_ptr + e, mask=jm, other=0.0)
            col = tl.load(cols_ptr + e, mask=jm, other=0).to(tl.int32)  # masked entries read x at column 0
            xv = gather_load(x_tile + col[None, :, :], HW_LOAD, X_BITS)  # [BM, BN, BV]
            acc3 += val.to(tl.float32)[None, :, :] * xv.to(tl.float32)
    acc = tl.sum(acc3, axis=2)  # [BLOCK_M, BLOCK_N]
    store_split_k(acc, y_ptr, ws_ptr, lock_ptr, bias_ptr, offs_m, offs_n, M, N, stride_ym, pid_s,
                  pid_m * tl.num_programs(0) + pid_n, SPLIT_K, HAS_BIAS)


@triton.jit
def _unpack_cols_kernel(values_ptr, cols_ptr, run_ptr, out_ptr, N, K, BLOCK_V: tl.constexpr):
    # one program per (row, tile) run: scatter its entries into the zeroed dense row (padding skipped)
    run = tl.program_id(0)
    n_tiles = tl.cdiv(K, 256)
    n = run // n_tiles
    t = run % n_tiles
    start = tl.load(run_ptr + run)
    length = tl.load(run_ptr + run + 1) - start
    for j0 in range(0, length, BLOCK_V):
        j = j0 + tl.arange(0, BLOCK_V)
        col = tl.load(cols_ptr + start + j, mask=j < length, other=0).to(tl.int32)
        val = tl.load(values_ptr + start + j, mask=j < length, other=0.0)
        kept = (j < length) & ((col != 0) | (j == 0))  # padding: column 0 past the run's first entry
        tl.store(out_ptr + n.to(tl.int64) * K + t * 256 + col, val, mask=kept)


_gemv_cols_tuned = triton.autotune(configs=_configs(), key=["N", "K", "BLOCK_M"], do_bench=autotune_bench)(
    _gemv_cols_kernel
)


def unpack_cols_triton(packed: PackedCols) -> torch.Tensor:
    """Dense [N, K] weight of a ``PackedCols`` (as ``formats.unpack_cols``, bit for bit), one Triton launch."""
    n, k = packed.shape
    check_triton_device(packed.values)
    out = torch.zeros(n, k, dtype=packed.dtype, device=packed.device)
    if packed.values.numel():
        _unpack_cols_kernel[(n * packed.tiles,)](packed.values, packed.cols, packed.run_ptr, out, n, k,
                                                 BLOCK_V=64)
    return out


def linear_cols_triton(
    x: torch.Tensor,
    packed: PackedCols,
    bias: torch.Tensor | None = None,
    path: KernelPath = "auto",
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """y = x @ W.T + bias with the Triton cols kernel. x: [..., K] -> y: [..., N] (dtype of x).

    path: "auto" or "gemv" (the only kernel; any number of rows, 8 per program). config: tile override
    (tests, benchmarks); block_k is BLOCK_V.
    """
    check_linear_inputs(x, packed, bias)
    check_triton_device(x)
    if path not in ("auto", "gemv"):
        raise ValueError(f"the cols format has only a gemv kernel: path must be 'auto' or 'gemv', got {path!r}")
    n, k = packed.shape
    x2 = flatten_rows(x)  # [M, K]
    m = x2.shape[0]
    y, b = gemv_output(x2, n, bias)
    if m == 0 or packed.nnz == 0:
        fill_bias(y, bias)
        return y.reshape(*x.shape[:-1], n)
    ptrs = (x2, packed.values, packed.cols, packed.run_ptr, b, y)
    rest = (m, n, k, x2.stride(0), y.stride(0))
    shapes = [(16, 16)] if interpreter_enabled() else COLS_SHAPES
    launch_gemv(_gemv_cols_kernel, _gemv_cols_tuned, shapes, ptrs, rest, m, n, k, x.device, config,
                step_k=COLS_TILE, inner="BLOCK_V", HAS_BIAS=bias is not None, HW_LOAD=not interpreter_enabled(),
                X_BITS=8 * x.element_size())
    return y.reshape(*x.shape[:-1], n)
