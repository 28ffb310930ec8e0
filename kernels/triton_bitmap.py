"""Triton unstructured sparse linear: y = x @ W.T (+ bias) with W in the ``PackedBitmap`` format.

Load-as-sparse, compute-as-dense. A program owns BLOCK_N rows and walks K in blocks of BLOCK_K inputs.
Per block it reads each input's bitmap bit, ranks the kept bits (an exclusive cumsum along the block)
and gathers the compacted values at ``row_ptr[n] + (values consumed by earlier blocks) + rank``. Values
are stored row-major, so a block's gathers touch one contiguous run per row and DRAM reads each value
once. The dense [BLOCK_N, BLOCK_K] tile then feeds fp32 FMAs (``gemv``, decode) or a ``tl.dot``
(``dot``, prefill). Measured on an H100 (docs/benchmarks.md) this is still 2-3x slower than dense at
decode: the per-input bit/rank/gather work, not DRAM, is the bottleneck. Reference:
``linear_bitmap_reference``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import (
    KernelPath,
    check_triton_device,
    choose_path,
    flatten_rows,
    interpreter_enabled,
    next_power_of_2,
)
from ._triton_util import autotune_bench
from .formats import PackedBitmap
from .reference import check_linear_inputs

__all__ = ["linear_bitmap_triton"]

# DENSITY_KEY = round(10 * density): the best block shape depends on how many values a block gathers.
KEY_GEMV = ["N", "K", "BLOCK_M", "DENSITY_KEY"]
KEY_DOT = ["N", "K", "M_BUCKET", "DENSITY_KEY"]  # M rounded up to a power of 2


def _gemv_configs() -> list[triton.Config]:
    # The interpreter crashes on multi-config autotune: one small config there.
    if interpreter_enabled():
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 64}, num_warps=4)]
    shapes = [(8, 256, 4), (16, 256, 4), (16, 512, 8), (32, 256, 8), (8, 1024, 8), (4, 512, 4)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=2) for bn, bk, w in shapes]


def _dot_configs() -> list[triton.Config]:
    if interpreter_enabled():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4)]
    shapes = [(16, 64, 128, 4, 3), (32, 64, 128, 4, 3), (64, 128, 64, 8, 3), (128, 128, 64, 8, 3),
              (32, 128, 128, 8, 3)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


@triton.jit
def _load_bitmap(bitmap_ptr, values_ptr, start, offs_n, k, N, K):
    """Dense tile W[offs_n, k] [BLOCK_N, BLOCK_K] and the number of kept values per row in it.

    start: [BLOCK_N] int64 index in values of each row's first kept value at or after k[0].
    """
    mask = (offs_n < N)[:, None] & (k < K)[None, :]
    rows = offs_n.to(tl.int64)[:, None]
    word = tl.load(bitmap_ptr + rows * ((K + 31) // 32) + (k // 32)[None, :], mask=mask, other=0)
    bit = (word >> (k % 32)[None, :]) & 1  # [BN, BK]
    rank = tl.cumsum(bit, axis=1) - bit  # kept values before k in this block
    vals = tl.load(values_ptr + start[:, None] + rank.to(tl.int64), mask=bit != 0, other=0.0)
    return vals, tl.sum(bit, axis=1)


@triton.autotune(configs=_gemv_configs(), key=KEY_GEMV, do_bench=autotune_bench)
@triton.jit
def _gemv_bitmap_kernel(
    x_ptr, bitmap_ptr, values_ptr, row_ptr, bias_ptr, y_ptr,
    M, N, K, stride_xm, stride_ym, DENSITY_KEY,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_m = tl.arange(0, BLOCK_M)
    start = tl.load(row_ptr + offs_n, mask=offs_n < N, other=0)  # [BN] int64
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # M == 1: reduce once, after the loop
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        w, count = _load_bitmap(bitmap_ptr, values_ptr, start, offs_n, k, N, K)
        w = w.to(tl.float32)  # [BN, BK]
        start += count
        if BLOCK_M == 1:
            xv = tl.load(x_ptr + pid_m * stride_xm + k, mask=k < K, other=0.0)
            acc2 += w * xv.to(tl.float32)[None, :]
        else:
            for mi in tl.static_range(BLOCK_M):
                m = pid_m * BLOCK_M + mi
                k_end = tl.where(m < M, K, 0)  # rows past M read nothing (one compare, no scalar & mask)
                xv = tl.load(x_ptr + m * stride_xm + k, mask=k < k_end, other=0.0)
                part = tl.sum(w * xv.to(tl.float32)[None, :], axis=1)  # [BN]
                acc = tl.where(rows_m[:, None] == mi, acc + part[None, :], acc)
    if BLOCK_M == 1:
        acc = tl.sum(acc2, axis=1)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    offs_m = pid_m * BLOCK_M + rows_m
    y_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.autotune(configs=_dot_configs(), key=KEY_DOT, do_bench=autotune_bench)
@triton.jit
def _dot_bitmap_kernel(
    x_ptr, bitmap_ptr, values_ptr, row_ptr, bias_ptr, y_ptr,
    M, N, K, stride_xm, stride_ym, DENSITY_KEY, M_BUCKET,
    HAS_BIAS: tl.constexpr, IEEE_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    num_m = tl.cdiv(M, BLOCK_M)
    pid = tl.program_id(0)
    pid_n = pid // num_m  # programs sharing a weight tile are adjacent: it is re-read from L2
    pid_m = pid % num_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    start = tl.load(row_ptr + offs_n, mask=offs_n < N, other=0)  # [BN] int64
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x_mask = (offs_m < M)[:, None] & (k < K)[None, :]
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=x_mask, other=0.0)
        w, count = _load_bitmap(bitmap_ptr, values_ptr, start, offs_n, k, N, K)  # [BN, BK]
        start += count
        if IEEE_FP32:
            acc = tl.dot(xt, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    y_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_mask)


def linear_bitmap_triton(
    x: torch.Tensor, packed: PackedBitmap, bias: torch.Tensor | None = None, path: KernelPath = "auto"
) -> torch.Tensor:
    """y = x @ W.T + bias with the Triton bitmap kernels. x: [..., K] -> y: [..., N] (dtype of x).

    path: "gemv" (FMA, best for decode), "dot" (tensor cores, prefill) or "auto" (by M).
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
    density_key = round(10 * packed.density)
    args = (x2, packed.bitmap, packed.values, packed.row_ptr, b, y, m, n, k, x2.stride(0), y.stride(0), density_key)
    if choose_path(path, m) == "gemv":
        block_m = min(next_power_of_2(m), 8)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, block_m))
        _gemv_bitmap_kernel[grid](*args, HAS_BIAS=bias is not None, BLOCK_M=block_m)
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        _dot_bitmap_kernel[grid](
            *args, min(next_power_of_2(m), 256), HAS_BIAS=bias is not None, IEEE_FP32=x.dtype == torch.float32
        )
    return y.reshape(*x.shape[:-1], n)
