"""Triton unstructured sparse linear: y = x @ W.T (+ bias) with W in the ``PackedBitmap`` format.

Load-as-sparse, compute-as-dense. A program owns BLOCK_N rows and walks K in steps of BLOCK_K inputs
= BLOCK_K / 32 bitmap words. Per step it loads each row's words and their 16-bit word offsets once
([BLOCK_N, W] tiles), broadcasts them over the 32 inputs of a word in registers, and gets the value of
kept weight (n, k) at ``row_ptr[n] + offset[n, w] + popcount(word & (2**(k % 32) - 1))`` (one popcount per
input: no prefix sum along the row). Values are compacted row-major, so a step's reads of one row are one
contiguous run and DRAM reads each value once. The dense [BLOCK_N, BLOCK_K] tile then feeds fp32 FMAs for
every row of x (``gemv``, decode; the weight is read once for all rows) or a ``tl.dot`` (``dot``).
Reference: ``linear_bitmap_reference``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import (
    KernelConfig,
    KernelPath,
    check_triton_device,
    choose_path,
    flatten_rows,
    interpreter_enabled,
)
from ._triton_util import autotune_bench, launch_tiled, popcount32
from .formats import PackedBitmap, bitmap_word_offsets
from .reference import check_linear_inputs

__all__ = ["linear_bitmap_triton"]


# Autotune candidates, (BLOCK_N, BLOCK_K, num_warps) for gemv and (BLOCK_M, BLOCK_N, BLOCK_K, num_warps,
# num_stages) for dot: small row blocks give every SM several programs (N / BLOCK_N >= 256 at N = 4096).
GEMV_SHAPES = [(4, 256, 4), (8, 128, 4), (8, 256, 4), (16, 128, 4), (4, 512, 4)]
DOT_SHAPES = [(16, 16, 256, 4, 2), (16, 32, 128, 4, 2), (16, 64, 128, 4, 2), (32, 64, 64, 4, 3),
              (64, 64, 64, 4, 3), (64, 128, 64, 8, 3)]


def _gemv_configs() -> list[triton.Config]:
    if interpreter_enabled():  # multi-config autotune crashes in the interpreter: one small config
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 64}, num_warps=4)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=2) for bn, bk, w in GEMV_SHAPES]


def _dot_configs() -> list[triton.Config]:
    if interpreter_enabled():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in DOT_SHAPES
    ]


@triton.jit
def _expand_bitmap(bitmap_ptr, offsets_ptr, values_ptr, row_start, offs_n, w, N, K, HW_POPC: tl.constexpr):
    """Dense tile W[offs_n, 32 w + t] as [BLOCK_N, BW * 32] (values dtype); w: [BW] word indices."""
    n_words = (K + 31) // 32
    mask = (offs_n < N)[:, None] & (w < n_words)[None, :]
    rows = offs_n.to(tl.int64)[:, None]
    word = tl.load(bitmap_ptr + rows * n_words + w[None, :], mask=mask, other=0)  # [BN, BW] int32
    off = tl.load(offsets_ptr + rows * n_words + w[None, :], mask=mask, other=0).to(tl.int32) & 0xFFFF
    t = tl.arange(0, 32)
    word3 = word[:, :, None]  # [BN, BW, 1]: broadcast over the word's 32 inputs
    kept = ((word3 >> t[None, None, :]) & 1) != 0  # padding bits past K are 0
    rank = popcount32(word3 & ~(-1 << t[None, None, :]), HW_POPC)  # kept inputs before t in the word
    row_vals = values_ptr + row_start[:, None, None]  # [BN, 1, 1] pointers (int64 row start)
    vals = tl.load(row_vals + (off[:, :, None] + rank), mask=kept, other=0.0)  # [BN, BW, 32]
    return tl.reshape(vals, (vals.shape[0], vals.shape[1] * 32))


@triton.jit
def _gemv_bitmap_kernel(
    x_ptr, bitmap_ptr, offsets_ptr, values_ptr, row_ptr, bias_ptr, y_ptr,
    M, N, K, stride_xm, stride_ym,
    HAS_BIAS: tl.constexpr, HW_POPC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_m = tl.arange(0, BLOCK_M)
    row_start = tl.load(row_ptr + offs_n, mask=offs_n < N, other=0)  # [BN] int64
    BW: tl.constexpr = BLOCK_K // 32
    # Partial products stay in a [BLOCK_M, BLOCK_N, BLOCK_K] register accumulator, reduced once after the
    # loop (a reduction per step and row costs more shuffles than the FMAs it serves).
    acc3 = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    offs_m = pid_m * BLOCK_M + rows_m
    for k0 in range(0, K, BLOCK_K):
        w = k0 // 32 + tl.arange(0, BW)
        k = k0 + tl.arange(0, BLOCK_K)
        wt = _expand_bitmap(bitmap_ptr, offsets_ptr, values_ptr, row_start, offs_n, w, N, K, HW_POPC)
        x_mask = (offs_m < M)[:, None] & (k < K)[None, :]
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=x_mask, other=0.0)  # [BM, BK]
        acc3 += wt.to(tl.float32)[None, :, :] * xt.to(tl.float32)[:, None, :]
    acc = tl.sum(acc3, axis=2)  # [BLOCK_M, BLOCK_N]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    y_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _dot_bitmap_kernel(
    x_ptr, bitmap_ptr, offsets_ptr, values_ptr, row_ptr, bias_ptr, y_ptr,
    M, N, K, stride_xm, stride_ym, M_BUCKET,
    HAS_BIAS: tl.constexpr, HW_POPC: tl.constexpr, IEEE_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    num_m = tl.cdiv(M, BLOCK_M)
    pid = tl.program_id(0)
    pid_n = pid // num_m  # programs sharing a weight tile are adjacent: it is re-read from L2
    pid_m = pid % num_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_start = tl.load(row_ptr + offs_n, mask=offs_n < N, other=0)  # [BN] int64
    BW: tl.constexpr = BLOCK_K // 32
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w = k0 // 32 + tl.arange(0, BW)
        k = k0 + tl.arange(0, BLOCK_K)
        x_mask = (offs_m < M)[None, :] & (k < K)[:, None]
        xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + k[:, None], mask=x_mask, other=0.0)  # [BK, BM]
        wt = _expand_bitmap(bitmap_ptr, offsets_ptr, values_ptr, row_start, offs_n, w, N, K, HW_POPC)
        if IEEE_FP32:
            acc = tl.dot(wt, xt, acc, input_precision="ieee")
        else:
            acc = tl.dot(wt, xt, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
    y_mask = (offs_m < M)[None, :] & (offs_n < N)[:, None]
    tl.store(y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None], acc.to(y_ptr.dtype.element_ty), mask=y_mask)


# Autotuned entry points (one tuning per weight shape and row bucket); the raw kernels take explicit tiles.
_gemv_bitmap_tuned = triton.autotune(configs=_gemv_configs(), key=["N", "K", "BLOCK_M"], do_bench=autotune_bench)(
    _gemv_bitmap_kernel
)
_dot_bitmap_tuned = triton.autotune(configs=_dot_configs(), key=["N", "K", "M_BUCKET"], do_bench=autotune_bench)(
    _dot_bitmap_kernel
)


def linear_bitmap_triton(
    x: torch.Tensor,
    packed: PackedBitmap,
    bias: torch.Tensor | None = None,
    path: KernelPath = "auto",
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """y = x @ W.T + bias with the Triton bitmap kernels. x: [..., K] -> y: [..., N] (dtype of x).

    path: "gemv" (FMA, decode), "dot" (tensor cores) or "auto" (by M). config: tile override (benchmarks).
    """
    check_linear_inputs(x, packed, bias)
    check_triton_device(x)
    n, k = packed.shape
    x2 = flatten_rows(x)  # [M, K]
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)  # [M, N]
    if m == 0 or packed.nnz == 0:
        y.copy_(bias.to(x.dtype).expand(m, n) if bias is not None else torch.zeros_like(y))
        return y.reshape(*x.shape[:-1], n)
    b = bias.to(x.dtype).contiguous() if bias is not None else y  # dummy pointer when no bias
    offsets = packed.word_offsets if packed.word_offsets is not None else bitmap_word_offsets(packed.bitmap)
    args = (x2, packed.bitmap, offsets, packed.values, packed.row_ptr, b, y, m, n, k, x2.stride(0), y.stride(0))
    launch_tiled(_gemv_bitmap_kernel, _gemv_bitmap_tuned, _dot_bitmap_kernel, _dot_bitmap_tuned, args,
                 choose_path(path, m), m, n, config, HAS_BIAS=bias is not None,
                 HW_POPC=not interpreter_enabled(), IEEE_FP32=x.dtype == torch.float32)
    return y.reshape(*x.shape[:-1], n)
