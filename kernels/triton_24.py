"""Triton 2:4 sparse linear: y = x @ W.T (+ bias) with W in the ``Packed24`` format.

Load-as-sparse, compute-as-dense, in the group domain. A program owns BLOCK_N rows of W and walks K in
steps of BLOCK_K inputs = G = BLOCK_K / 4 groups. Per step it reads the compressed values as one
contiguous [BLOCK_N, G, 2] tile (16-byte vector loads) and one 32-bit meta word per 8 groups, and expands
them in registers into the four dense columns of each group, ``w_c[n, g] = W[n, 4g + c]`` (c = 0..3), with
selects on the 2-bit indices (pack_24 stores a group's two indices in increasing order, so i0 < i1):
* ``gemv`` for one row of x (``_gemv_24_kernel``): no expansion. Values as [BLOCK_N, W, 16] (W = BLOCK_K / 32
  meta words), one meta word per 16 values, x gathered at each stored value's input, one fp32 FMA per
  stored value; values and meta are cp.async copies NUM_STAGES - 1 steps ahead (Triton's pipeliner, the K
  loop is a ``tl.range(num_stages=...)``), 32-bit offsets;
* ``gemv`` for 2..16 rows (``_gemv_24_tc_kernel``, the default): tensor cores with the weight on the MMA's
  M side, ``acc[BLOCK_N, 16] += W_expanded [BLOCK_N, BLOCK_K] @ x^T [BLOCK_K, 16]``, W expanded in registers
  to input order; under ``path="auto"`` it also takes 9..15 rows (16+ run cuBLAS on the unpacked weight,
  ``dispatch``). ``_gemv_24_expand_kernel`` (an explicit config with block_m 2..8): the four dense columns
  feed fp32 FMAs for every row of x. The gemv kernels split K over the grid's second axis
  (``_triton_util.store_split_k``);
* ``dot`` (tensor cores): four ``tl.dot(w_c [BLOCK_N, G], x_c [G, BLOCK_M])`` per step, the same number of
  tensor-core FLOPs as dense, fp32 accumulation; BLOCK_M >= 16 rows of x (rows past M are masked).
The torch reference is ``reference.linear_24_reference``. This module imports triton: import it only on
CUDA or in interpreter mode (``dispatch`` does so lazily).
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
    gemv_output,
    interpreter_enabled,
)
from ._triton_util import (
    autotune_bench,
    launch_gemv,
    launch_tiled,
    prune_under_two_waves,
    split_k_range,
    store_split_k,
)
from .formats import Packed24
from .reference import check_linear_inputs

__all__ = ["linear_24_triton", "unpack_24_triton"]


# Autotune candidates: (BLOCK_N, BLOCK_K, num_warps, num_stages) for the gemv kernels (num_stages is also the K
# loop's tl.range(num_stages): cp.async stages) and (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for dot.
# gather, M = 1: 8192 weights a step (32 values a thread), so split-K reaches two waves at N = 1024, K = 4096;
# the 8-warp config (32 values a thread, 16384 weights a step) has the fewest SASS per dense weight (sm_90
# 6.34, sm_80 6.36) at the same threads per SM, but under two programs per SM at N = 1024, K = 4096, where
# prune_under_two_waves drops it (docs/benchmarks.md, "SASS"). 8 warps with 16 values a thread measured
# 6.59-7.03 (sm_90) / 7.09-7.50 (sm_80) and were not kept.
GEMV_SHAPES = [(16, 512, 4, 2), (16, 512, 4, 3), (16, 512, 4, 4), (32, 256, 4, 3), (32, 512, 8, 2)]
EXPAND_SHAPES = [(4, 512, 4, 3), (8, 256, 4, 3), (8, 512, 4, 3), (16, 256, 4, 3), (16, 128, 4, 3)]  # expand, 2..8
# tensor-core gemv, M = 2..16 (BLOCK_M = 16): (BLOCK_N, BLOCK_K, num_warps, num_stages). Serves 2..TC_MAX_M rows
# under path="auto" (2..8 by default, and 9..15 that would otherwise run the dot kernel; 16+ go to cuBLAS).
TC_BLOCK_M = 16
TC_MAX_M = 15
TC_SHAPES = [(32, 256, 2, 3), (16, 512, 2, 3), (64, 128, 2, 3), (32, 256, 4, 2)]  # 8192 weights a step
DOT_SHAPES = [(16, 16, 256, 4, 2), (16, 32, 256, 4, 2), (16, 64, 256, 4, 2), (64, 64, 128, 4, 3),
              (64, 128, 128, 8, 3), (128, 128, 128, 8, 3)]


def _staged_configs(shapes: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    if interpreter_enabled():  # multi-config autotune crashes in the interpreter: one small config
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 64, "NUM_STAGES": 2}, num_warps=4)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "NUM_STAGES": st}, num_warps=w, num_stages=st)
            for bn, bk, w, st in shapes]


def _gemv_configs() -> list[triton.Config]:
    return _staged_configs(GEMV_SHAPES)


def _expand_configs() -> list[triton.Config]:
    return _staged_configs(EXPAND_SHAPES)


def _tc_configs() -> list[triton.Config]:
    return _staged_configs(TC_SHAPES)


def _dot_configs() -> list[triton.Config]:
    if interpreter_enabled():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in DOT_SHAPES
    ]


@triton.jit
def _expand_24(values_ptr, meta_ptr, offs_n, k0, N, K, G: tl.constexpr):
    """Dense columns of the G groups from input k0 on: four [BLOCK_N, G] tensors w_c[n, g] = W[n, k0 + 4g + c]."""
    g = k0 // 4 + tl.arange(0, G)
    mask = (offs_n < N)[:, None] & (g < K // 4)[None, :]
    rows = offs_n.to(tl.int64)[:, None]
    j = k0 // 2 + tl.arange(0, 2 * G)  # value indices of the groups: one contiguous run per row
    vmask = (offs_n < N)[:, None] & (j < K // 2)[None, :]
    vals = tl.load(values_ptr + rows * (K // 2) + j[None, :], mask=vmask, other=0.0)  # [BN, 2G], 16 B loads
    v0, v1 = tl.split(tl.reshape(vals, (vals.shape[0], G, 2)))  # [BN, G]: first / second kept value
    # Value j = 2g + s has its 2-bit index at bit 2 * (j % 16) of word j // 16: group g is nibble g % 8.
    word = tl.load(meta_ptr + rows * ((K // 2 + 15) // 16) + (g // 8)[None, :], mask=mask, other=0)
    nib = word >> (4 * (g % 8))[None, :]
    i0 = nib & 3
    i1 = (nib >> 2) & 3
    zero = tl.zeros_like(v0)
    w0 = tl.where(i0 == 0, v0, zero)  # i0 < i1: column 0 can only hold v0, column 3 only v1
    w1 = tl.where(i0 == 1, v0, tl.where(i1 == 1, v1, zero))
    w2 = tl.where(i0 == 2, v0, tl.where(i1 == 2, v1, zero))
    w3 = tl.where(i1 == 3, v1, zero)
    return w0, w1, w2, w3


@triton.jit
def _gemv_24_kernel(
    x_ptr, values_ptr, meta_ptr, bias_ptr, y_ptr, ws_ptr, lock_ptr,
    M, N, K, stride_xm, stride_ym,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    # Gather x, FMA only the stored values: per step, values [BN, W, 16] (W = BLOCK_K / 32 meta words, 16
    # values per word) and one meta word per 16 values; value (w, j) sits at input 32 w + 4 (j // 2) + idx.
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    W: tl.constexpr = BLOCK_K // 32
    w = tl.arange(0, W)
    j = tl.arange(0, 16)
    n_mask = offs_n < N
    half = K // 2
    n_words = (half + 15) // 16
    SPLIT_K = tl.num_programs(1)  # split-K: each split walks its own run of whole K steps
    k_lo, k_hi = split_k_range(K, pid_s, SPLIT_K, BLOCK_K)
    # 32-bit offsets (the launcher checks N * K / 2 < 2**31)
    v_rows = values_ptr + (offs_n * half)[:, None, None]
    m_rows = meta_ptr + (offs_n * n_words)[:, None]
    # unmasked x gathers: rows past M read row M - 1 (never stored), columns clamped to K - 1 (the masked
    # values are 0, so those products vanish for finite x, as the zeros of a dense row do)
    x_rows = x_ptr + (tl.minimum(offs_m, M - 1) * stride_xm)[:, None, None, None]
    rel = (16 * w)[:, None] + j[None, :]  # [W, 16] value index in the step
    col0 = (32 * w)[:, None] + 4 * (j // 2)[None, :]  # [W, 16] first input of the value's group
    shift = 2 * j
    acc = tl.zeros((BLOCK_M, BLOCK_N, W, 16), dtype=tl.float32)
    w_hi = (k_hi + 31) // 32  # words of this split (a split ends on a K step, so on a word)
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=NUM_STAGES):  # values and meta: cp.async copies
        h = k0 // 2 + rel
        mask = n_mask[:, None, None] & (h < k_hi // 2)[None, :, :]
        v = tl.load(v_rows + h[None, :, :], mask=mask, other=0.0)  # [BN, W, 16]
        wmask = n_mask[:, None] & (k0 // 32 + w < w_hi)[None, :]
        word = tl.load(m_rows + (k0 // 32 + w)[None, :], mask=wmask, other=0)  # [BN, W]
        idx = (word[:, :, None] >> shift[None, None, :]) & 3  # [BN, W, 16]
        col = k0 + col0[None, :, :] + idx
        xv = tl.load(x_rows + tl.minimum(col, K - 1)[None, :, :, :])
        acc += v.to(tl.float32)[None, :, :, :] * xv.to(tl.float32)
    acc2 = tl.sum(tl.sum(acc, axis=3), axis=2)  # [BLOCK_M, BLOCK_N]
    store_split_k(acc2, y_ptr, ws_ptr, lock_ptr, bias_ptr, offs_m, offs_n, M, N, stride_ym, pid_s,
                  pid_m * tl.num_programs(0) + pid_n, SPLIT_K, HAS_BIAS)



@triton.jit
def _gemv_24_expand_kernel(
    x_ptr, values_ptr, meta_ptr, bias_ptr, y_ptr, ws_ptr, lock_ptr,
    M, N, K, stride_xm, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    # M >= 2: expand W to its four dense columns per group (x is reused across rows); split-K as the gather kernel
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    SPLIT_K = tl.num_programs(1)
    k_lo, k_hi = split_k_range(K, pid_s, SPLIT_K, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_m = tl.arange(0, BLOCK_M)
    G: tl.constexpr = BLOCK_K // 4
    # Per-step partial products stay in a [BLOCK_M, BLOCK_N, G] register accumulator, reduced once after
    # the loop (a reduction per step and row costs more shuffles than the FMAs it serves).
    acc3 = tl.zeros((BLOCK_M, BLOCK_N, G), dtype=tl.float32)
    offs_m = pid_m * BLOCK_M + rows_m
    c4 = tl.arange(0, 4)
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=NUM_STAGES):  # values, meta and x: cp.async copies
        g = k0 // 4 + tl.arange(0, G)
        w0, w1, w2, w3 = _expand_24(values_ptr, meta_ptr, offs_n, k0, N, K, G)
        # x tile [BLOCK_M, G, 4] of every row, loaded once (coalesced), split into its 4 columns in registers
        cols = (4 * g)[:, None] + c4[None, :]
        x_mask = (offs_m < M)[:, None, None] & (cols < K)[None, :, :]
        xt = tl.load(x_ptr + offs_m[:, None, None] * stride_xm + cols[None, :, :], mask=x_mask, other=0.0)
        x02, x13 = tl.split(tl.reshape(xt.to(tl.float32), (BLOCK_M, G, 2, 2)))  # column c = 2a + b
        x0, x2 = tl.split(x02)
        x1, x3 = tl.split(x13)
        acc3 += (w0.to(tl.float32)[None, :, :] * x0[:, None, :] + w1.to(tl.float32)[None, :, :] * x1[:, None, :]
                 + w2.to(tl.float32)[None, :, :] * x2[:, None, :] + w3.to(tl.float32)[None, :, :] * x3[:, None, :])
    acc = tl.sum(acc3, axis=2)  # [BLOCK_M, BLOCK_N]
    store_split_k(acc, y_ptr, ws_ptr, lock_ptr, bias_ptr, offs_m, offs_n, M, N, stride_ym, pid_s,
                  pid_m * tl.num_programs(0) + pid_n, SPLIT_K, HAS_BIAS)


@triton.jit
def _gemv_24_tc_kernel(
    x_ptr, values_ptr, meta_ptr, bias_ptr, y_ptr, ws_ptr, lock_ptr,
    M, N, K, stride_xm, stride_ym,
    HAS_BIAS: tl.constexpr, IEEE_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    # M = 2..16 on tensor cores with the weight on the M side of the MMA: acc[BLOCK_N, M_pad] += W_expanded
    # [BLOCK_N, BLOCK_K] @ x^T [BLOCK_K, M_pad], M_pad = BLOCK_M = 16 (rows past M are masked), so the MMA's
    # 16-row minimum falls on the output features, not on the few rows of x. W is expanded in registers
    # (the four dense columns of each group interleaved back to input order); split-K as the gemv kernels.
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    SPLIT_K = tl.num_programs(1)
    k_lo, k_hi = split_k_range(K, pid_s, SPLIT_K, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    G: tl.constexpr = BLOCK_K // 4
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=NUM_STAGES):
        w0, w1, w2, w3 = _expand_24(values_ptr, meta_ptr, offs_n, k0, N, K, G)
        w4 = tl.permute(tl.join(tl.join(w0, w1), tl.join(w2, w3)), (0, 1, 3, 2))  # [BN, G, c // 2, c % 2]
        wt = tl.reshape(w4, (BLOCK_N, BLOCK_K))  # W[n, k0 + 4g + c] at column 4g + c
        k = k0 + tl.arange(0, BLOCK_K)
        x_mask = (offs_m < M)[None, :] & (k < k_hi)[:, None]
        xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + k[:, None], mask=x_mask, other=0.0)  # [BK, BM]
        if IEEE_FP32:
            acc = tl.dot(wt, xt, acc, input_precision="ieee")
        else:
            acc = tl.dot(wt, xt, acc)
    store_split_k(tl.trans(acc), y_ptr, ws_ptr, lock_ptr, bias_ptr, offs_m, offs_n, M, N, stride_ym, pid_s,
                  pid_m * tl.num_programs(0) + pid_n, SPLIT_K, HAS_BIAS)


@triton.jit
def _dot_24_kernel(
    x_ptr, values_ptr, meta_ptr, bias_ptr, y_ptr,
    M, N, K, stride_xm, stride_ym, M_BUCKET,
    HAS_BIAS: tl.constexpr, IEEE_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # acc[n, m] = sum_c w_c[n, :] @ x_c[:, m] with x_c[g, m] = x[m, 4g + c]: dense tensor-core work.
    num_m = tl.cdiv(M, BLOCK_M)
    pid = tl.program_id(0)
    pid_n = pid // num_m  # programs sharing a weight tile are adjacent: it is re-read from L2
    pid_m = pid % num_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    G: tl.constexpr = BLOCK_K // 4
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        g = k0 // 4 + tl.arange(0, G)
        w0, w1, w2, w3 = _expand_24(values_ptr, meta_ptr, offs_n, k0, N, K, G)
        x_base = x_ptr + offs_m[None, :] * stride_xm + 4 * g[:, None]  # [G, BM]
        x_mask = (offs_m < M)[None, :] & (g < K // 4)[:, None]
        x0 = tl.load(x_base, mask=x_mask, other=0.0)
        x1 = tl.load(x_base + 1, mask=x_mask, other=0.0)
        x2 = tl.load(x_base + 2, mask=x_mask, other=0.0)
        x3 = tl.load(x_base + 3, mask=x_mask, other=0.0)
        if IEEE_FP32:
            acc = tl.dot(w0, x0, acc, input_precision="ieee")
            acc = tl.dot(w1, x1, acc, input_precision="ieee")
            acc = tl.dot(w2, x2, acc, input_precision="ieee")
            acc = tl.dot(w3, x3, acc, input_precision="ieee")
        else:
            acc = tl.dot(w0, x0, acc)
            acc = tl.dot(w1, x1, acc)
            acc = tl.dot(w2, x2, acc)
            acc = tl.dot(w3, x3, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
    y_mask = (offs_m < M)[None, :] & (offs_n < N)[:, None]
    tl.store(y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None], acc.to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _unpack_24_kernel(values_ptr, meta_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Dense W [N, K] (zeros at the dropped inputs) for the prefill fallback (cuBLAS on the unpacked weight).
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    G: tl.constexpr = BLOCK_K // 4
    w0, w1, w2, w3 = _expand_24(values_ptr, meta_ptr, offs_n, k0, N, K, G)
    g = k0 // 4 + tl.arange(0, G)
    mask = (offs_n < N)[:, None] & (g < K // 4)[None, :]
    out = out_ptr + offs_n.to(tl.int64)[:, None] * K + 4 * g[None, :]
    tl.store(out, w0, mask=mask)
    tl.store(out + 1, w1, mask=mask)
    tl.store(out + 2, w2, mask=mask)
    tl.store(out + 3, w3, mask=mask)


def unpack_24_triton(packed: Packed24) -> torch.Tensor:
    """Dense [N, K] weight of a 2:4 pack (as ``formats.unpack_24``, bit for bit), by one Triton launch."""
    n, k = packed.shape
    check_triton_device(packed.values)
    out = torch.empty(n, k, dtype=packed.dtype, device=packed.device)
    bn, bk = (16, 64) if interpreter_enabled() else (32, 256)
    _unpack_24_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk))](packed.values, packed.meta, out, n, k,
                                                                 BLOCK_N=bn, BLOCK_K=bk)
    return out


# Autotuned entry points (one tuning per weight shape and row bucket); the raw kernels take explicit tiles.
_gemv_24_tuned = triton.autotune(configs=_gemv_configs(), key=["N", "K", "BLOCK_M"], do_bench=autotune_bench,
                                 prune_configs_by={"early_config_prune": prune_under_two_waves})(_gemv_24_kernel)
_gemv_24_expand_tuned = triton.autotune(configs=_expand_configs(), key=["N", "K", "BLOCK_M"],
                                        do_bench=autotune_bench)(_gemv_24_expand_kernel)
_gemv_24_tc_tuned = triton.autotune(configs=_tc_configs(), key=["N", "K", "BLOCK_M"], do_bench=autotune_bench)(
    _gemv_24_tc_kernel
)
_dot_24_tuned = triton.autotune(configs=_dot_configs(), key=["N", "K", "M_BUCKET"], do_bench=autotune_bench)(
    _dot_24_kernel
)


def linear_24_triton(
    x: torch.Tensor,
    packed: Packed24,
    bias: torch.Tensor | None = None,
    path: KernelPath = "auto",
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """y = x @ W.T + bias with the Triton 2:4 kernels. x: [..., K] -> y: [..., N] (dtype of x).

    path: "gemv" (FMA, decode), "dot" (tensor cores) or "auto" (by M). config: tile override (benchmarks).
    """
    check_linear_inputs(x, packed, bias)
    check_triton_device(x)
    n, k = packed.shape
    x2 = flatten_rows(x)  # [M, K]
    m = x2.shape[0]
    y, b = gemv_output(x2, n, bias)  # [M, N]; b: y as a dummy pointer when no bias
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    if n * (k // 2) >= 2**31:
        raise ValueError(f"the 2:4 kernels use 32-bit offsets: N * K / 2 must be < 2**31, got {n} x {k}")
    kind = choose_path(path, m)
    if path == "auto" and m <= TC_MAX_M:
        kind = "gemv"  # 9..15 rows: the tensor-core gemv (split-K) rather than the dot kernel
    if kind == "gemv":
        ptrs, rest = (x2, packed.values, packed.meta, b, y), (m, n, k, x2.stride(0), y.stride(0))
        rows = config.block_m if config else (1 if m == 1 else TC_BLOCK_M)
        if rows == TC_BLOCK_M:  # 2..16 rows a program: tensor cores, W on the MMA's M side
            shapes = [(16, 64)] if interpreter_enabled() else TC_SHAPES
            launch_gemv(_gemv_24_tc_kernel, _gemv_24_tc_tuned, shapes, ptrs, rest, m, n, k, x.device, config,
                        block_m=TC_BLOCK_M, HAS_BIAS=bias is not None, IEEE_FP32=x.dtype == torch.float32)
            return y.reshape(*x.shape[:-1], n)
        gather = rows == 1  # gather x for one row; expand W for 2..8 rows (explicit configs only)
        shapes = [(16, 64)] if interpreter_enabled() else GEMV_SHAPES if gather else EXPAND_SHAPES
        kernel, tuned = (_gemv_24_kernel, _gemv_24_tuned) if gather else (_gemv_24_expand_kernel, _gemv_24_expand_tuned)
        launch_gemv(kernel, tuned, shapes, ptrs, rest, m, n, k, x.device, config, HAS_BIAS=bias is not None)
        return y.reshape(*x.shape[:-1], n)
    args = (x2, packed.values, packed.meta, b, y, m, n, k, x2.stride(0), y.stride(0))
    launch_tiled(_gemv_24_kernel, _gemv_24_tuned, _dot_24_kernel, _dot_24_tuned, args, kind,
                 m, n, config, HAS_BIAS=bias is not None, IEEE_FP32=x.dtype == torch.float32)
    return y.reshape(*x.shape[:-1], n)
