"""Triton 2:4 sparse linear: y = x @ W.T (+ bias) with W in the ``Packed24`` format.

Load-as-sparse: each program reads the compressed values [BLOCK_N, BLOCK_K/2] (contiguous) and their
2-bit indices, and never materializes the dense weight:
* ``gemv`` (small M, decode): every kept value gathers the x element it multiplies (x is L1-resident)
  and accumulates with fp32 FMAs; no padding of M to the 16 rows a tensor-core dot needs;
* ``dot`` (prefill chunks): four dense ``tl.dot`` calls in the compressed K/2 space, one per slot of a
  group (see the kernel comment), fp32 accumulation.
Measured on an H100 (docs/benchmarks.md): gemv at M=1 runs at 0.75-0.98x dense cuBLAS; the dot path is
far slower than dense and is a known gap. The torch reference is ``reference.linear_24_reference``.
This module imports triton: import it only on CUDA or in interpreter mode (``dispatch`` does so lazily).
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
from .formats import Packed24
from .reference import check_linear_inputs

__all__ = ["linear_24_triton"]

KEY_GEMV = ["N", "K", "BLOCK_M"]
KEY_DOT = ["N", "K", "M_BUCKET"]  # M rounded up to a power of 2: one tuning per size class


def _gemv_configs() -> list[triton.Config]:
    # The interpreter crashes on multi-config autotune: one small config there.
    if interpreter_enabled():
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 64}, num_warps=4)]
    shapes = [(8, 256, 4), (16, 256, 4), (16, 512, 4), (32, 256, 8), (8, 1024, 8), (16, 1024, 8)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=2) for bn, bk, w in shapes]


def _dot_configs() -> list[triton.Config]:
    if interpreter_enabled():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4)]
    shapes = [(16, 64, 128, 4, 4), (32, 64, 128, 4, 4), (64, 128, 64, 8, 3), (128, 128, 64, 8, 3),
              (32, 128, 128, 8, 3)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


@triton.jit
def _load_24(values_ptr, meta_ptr, offs_n, j, N, K):
    """Values [BLOCK_N, BJ] at value indices j (2 per group of 4 inputs) and the input each one multiplies.

    Returns (vals, col): vals zero outside W; col = 4 * (j // 2) + idx, idx read from the 2-bit meta.
    """
    mask = (offs_n < N)[:, None] & (j < K // 2)[None, :]
    rows = offs_n.to(tl.int64)[:, None]
    vals = tl.load(values_ptr + rows * (K // 2) + j[None, :], mask=mask, other=0.0)  # contiguous, vectorized
    word = tl.load(meta_ptr + rows * ((K // 2 + 15) // 16) + (j // 16)[None, :], mask=mask, other=0)
    idx = (word >> (2 * (j % 16))[None, :]) & 3
    return vals, 4 * (j // 2)[None, :] + idx


@triton.autotune(configs=_gemv_configs(), key=KEY_GEMV, do_bench=autotune_bench)
@triton.jit
def _gemv_24_kernel(
    x_ptr, values_ptr, meta_ptr, bias_ptr, y_ptr,
    M, N, K, stride_xm, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Sparse side stays compressed: each kept value gathers its x element (x is tiny and L1-resident).
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_m = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_K // 2), dtype=tl.float32)  # M == 1: reduce once, after the loop
    for k0 in range(0, K, BLOCK_K):
        j = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        vals, col = _load_24(values_ptr, meta_ptr, offs_n, j, N, K)  # [BN, BK/2] each
        vals = vals.to(tl.float32)
        if BLOCK_M == 1:
            xg = tl.load(x_ptr + pid_m * stride_xm + col, mask=col < K, other=0.0)
            acc2 += vals * xg.to(tl.float32)
        else:
            for mi in tl.static_range(BLOCK_M):
                m = pid_m * BLOCK_M + mi
                k_end = tl.where(m < M, K, 0)  # rows past M read nothing (one compare, no scalar & mask)
                xg = tl.load(x_ptr + m * stride_xm + col, mask=col < k_end, other=0.0)
                part = tl.sum(vals * xg.to(tl.float32), axis=1)  # [BN]
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
def _dot_24_kernel(
    x_ptr, values_ptr, meta_ptr, bias_ptr, y_ptr,
    M, N, K, stride_xm, stride_ym, M_BUCKET,
    HAS_BIAS: tl.constexpr, IEEE_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # y = sum_c X_c @ W_c.T over the 4 slots c of a group, in the compressed K/2 space:
    #   W_c[n, j] = vals[n, j] if idx[n, j] == c else 0,   X_c[m, j] = x[m, 4 * (j // 2) + c].
    # Twice the dense tensor-core work (cheap at these sizes), but every tile stays 2-D and values load
    # contiguously, with no register reshuffle to expand groups.
    num_m = tl.cdiv(M, BLOCK_M)
    pid = tl.program_id(0)
    pid_n = pid // num_m  # programs sharing a weight tile are adjacent: it is re-read from L2
    pid_m = pid % num_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        j = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        vals, col = _load_24(values_ptr, meta_ptr, offs_n, j, N, K)  # [BN, BK/2]
        idx = col % 4
        x_row = x_ptr + offs_m[:, None] * stride_xm + (4 * (j // 2))[None, :]  # [BM, BK/2]
        x_mask = (offs_m < M)[:, None] & (j < K // 2)[None, :]
        for c in tl.static_range(4):
            xc = tl.load(x_row + c, mask=x_mask, other=0.0)
            wc = tl.where(idx == c, vals, 0.0)
            if IEEE_FP32:
                acc = tl.dot(xc, tl.trans(wc), acc, input_precision="ieee")
            else:
                acc = tl.dot(xc, tl.trans(wc), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    y_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_mask)


def linear_24_triton(
    x: torch.Tensor, packed: Packed24, bias: torch.Tensor | None = None, path: KernelPath = "auto"
) -> torch.Tensor:
    """y = x @ W.T + bias with the Triton 2:4 kernels. x: [..., K] -> y: [..., N] (dtype of x).

    path: "gemv" (FMA, best for decode), "dot" (tensor cores, prefill) or "auto" (by M).
    """
    check_linear_inputs(x, packed, bias)
    check_triton_device(x)
    n, k = packed.shape
    x2 = flatten_rows(x)  # [M, K]
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)  # [M, N]
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    b = bias.to(x.dtype).contiguous() if bias is not None else y  # dummy pointer when no bias
    if choose_path(path, m) == "gemv":
        block_m = min(next_power_of_2(m), 8)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, block_m))
        _gemv_24_kernel[grid](
            x2, packed.values, packed.meta, b, y, m, n, k, x2.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, BLOCK_M=block_m,
        )
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        _dot_24_kernel[grid](
            x2, packed.values, packed.meta, b, y, m, n, k, x2.stride(0), y.stride(0),
            min(next_power_of_2(m), 256),
            HAS_BIAS=bias is not None, IEEE_FP32=x.dtype == torch.float32,
        )
    return y.reshape(*x.shape[:-1], n)
