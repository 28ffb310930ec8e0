"""Triton unstructured sparse linear: y = x @ W.T (+ bias) with W in the ``PackedBitmap`` format.

Load-as-sparse, compute-as-dense. A program owns BLOCK_N rows and walks K in steps of BLOCK_K inputs
= BLOCK_K / 32 bitmap words. Per step it loads each row's words and their 16-bit word offsets once
([BLOCK_N, W] tiles), broadcasts them over the 32 inputs of a word in registers, and gets the value of
kept weight (n, k) at ``row_ptr[n] + offset[n, w] + popcount(word & (2**(k % 32) - 1))`` (one popcount per
input: no prefix sum along the row). Values are compacted row-major, so a step's reads of one row are one
contiguous run and DRAM reads each value once. The dense [BLOCK_N, BLOCK_K] tile then feeds a ``tl.dot``
(``dot``) or is stored (``unpack_bitmap_triton``, the prefill fallback of ``dispatch``).
The gemv (``_gemv_bitmap_kernel``, 1..8 rows of x a program) does not build the dense tile: lanes run along
K (one bitmap word per lane, the rows of the block across warps and registers, so each x load serves several
rows), and each thread walks its word's 32 inputs in order with a running pointer to the next kept value
(no popcount, no broadcast of a word to 32 lanes; the value at the pointer is loaded for every input and
only the FMAs are predicated, which the readable element after the last value allows); words and word
offsets are cp.async copies, pipelined ``NUM_STAGES - 1`` steps ahead by Triton (``tl.range(num_stages=...)``).
It splits K over the grid's second axis and uses 32-bit offsets.
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
    fill_bias,
    flatten_rows,
    gemv_output,
    interpreter_enabled,
)
from ._triton_util import autotune_bench, launch_gemv, launch_tiled, popcount32, split_k_range, store_split_k
from .formats import PackedBitmap, bitmap_word_offsets, values_have_tail
from .reference import check_linear_inputs

__all__ = ["linear_bitmap_triton", "unpack_bitmap_triton"]


# Autotune candidates, (BLOCK_N, BLOCK_K, num_warps) for gemv and (BLOCK_M, BLOCK_N, BLOCK_K, num_warps,
# num_stages) for dot: small row blocks give every SM several programs (N / BLOCK_N >= 256 at N = 4096).
# M = 1, (BLOCK_N, BLOCK_K, num_warps, num_stages): BLOCK_K / 32 words along the lanes (a warp at 1024, half a
# warp at 512), each thread holds one word of BLOCK_N * BLOCK_K / (1024 * num_warps) rows (8 at one warp), and
# those rows share each x load; 8192 weights a step, so split-K reaches two waves at N = 1024, K = 4096.
GEMV_SHAPES = [(8, 1024, 1, 2), (16, 512, 1, 2), (32, 256, 1, 2), (8, 1024, 1, 3)]
ROWS_SHAPES = [(8, 1024, 1, 2), (4, 1024, 1, 2), (8, 512, 1, 2)]  # the same kernel, M = 2..8
DOT_SHAPES = [(16, 16, 256, 4, 2), (16, 32, 128, 4, 2), (16, 64, 128, 4, 2), (32, 64, 64, 4, 3),
              (64, 64, 64, 4, 3), (64, 128, 64, 8, 3)]


def _gemv_configs() -> list[triton.Config]:
    if interpreter_enabled():  # multi-config autotune crashes in the interpreter: one small config
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 64, "NUM_STAGES": 2}, num_warps=4)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "NUM_STAGES": st}, num_warps=w, num_stages=st)
            for bn, bk, w, st in GEMV_SHAPES]


def _rows_configs() -> list[triton.Config]:
    if interpreter_enabled():
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 64, "NUM_STAGES": 2}, num_warps=4)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "NUM_STAGES": st}, num_warps=w, num_stages=st)
            for bn, bk, w, st in ROWS_SHAPES]


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
def _count_loop(x_rows, bitmap_ptr, pairs_ptr, values_ptr, row_start, rows, n_mask, wi, k_lo, k_hi, w_hi, K, one,
                EVEN_K: tl.constexpr, GUARD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr):
    """The K loop of _gemv_bitmap_kernel: [BLOCK_M, BLOCK_N, BLOCK_K / 32] fp32 partial sums, one per word slot.

    x_rows: [BLOCK_M] row pointers of x. GUARD: mask the value loads by the bit. Without it every input loads
    the value at the running pointer and only the FMAs are predicated (no zero fill of a masked load, one
    instruction less per input); that pointer never passes one element after the last stored value, which
    ``pack_bitmap`` leaves readable (``formats.values_have_tail``; the launcher sets GUARD where it does not)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K // 32), dtype=tl.float32)
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=NUM_STAGES):
        w = k0 // 32 + wi
        mask = n_mask[:, None] & (w < w_hi)[None, :]
        e = rows + w[None, :]  # flat word index
        word = tl.load(bitmap_ptr + e, mask=mask, other=0)  # [BN, BW] int32, padding bits past K are 0
        pair = tl.load(pairs_ptr + (e >> 1), mask=mask, other=0)
        off = (pair >> ((e & 1) * 16)) & 0xFFFF  # kept values of the row before the word
        vp = values_ptr + (row_start + off)  # running pointer: the next kept value of the row
        if EVEN_K:  # clamped, unmasked x loads (words past the split are all zero bits)
            xw = x_rows[:, None] + tl.minimum(k0 + 32 * wi, K - 32)[None, :]  # [BM, BW]
        else:
            xw = x_rows[:, None] + (k0 + 32 * wi)[None, :]
        for t in tl.static_range(32):
            if EVEN_K:
                xf = tl.load(xw + t).to(tl.float32)[:, None, :]  # [BM, 1, BW], shared by the thread's rows
            else:
                xf = tl.load(xw + t, mask=(k0 + 32 * wi + t < K)[None, :], other=0.0).to(tl.float32)[:, None, :]
            kept = (word & (one << t)) != 0  # a runtime 1: LLVM keeps the AND with a mask (one LOP3)
            if GUARD:
                v = tl.load(vp, mask=kept, other=0.0)
                acc += v.to(tl.float32)[None, :, :] * xf
            else:
                v = tl.load(vp)
                acc = tl.where(kept[None, :, :], acc + v.to(tl.float32)[None, :, :] * xf, acc)
            vp = tl.where(kept, vp + 1, vp)
    return acc


@triton.jit
def _gemv_bitmap_kernel(
    x_ptr, bitmap_ptr, offsets_ptr, values_ptr, row_ptr, bias_ptr, y_ptr, ws_ptr, lock_ptr,
    M, N, K, stride_xm, stride_ym,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, GUARD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    # BLOCK_M rows of x (1 for decode). Lanes along K: the [BLOCK_N, BW] word tile has no contiguity along its
    # words (max_contiguous 1), so Triton lays one word per lane along K and the rows across warps and
    # registers: a warp reads 32 consecutive words of a row (128 B), and each thread holds the same word of
    # BLOCK_N * BW / (32 * num_warps) rows, so one x load per input serves all of them. The words and the word
    # offsets (read as int32 pairs, 4 bytes a thread) are cp.async copies NUM_STAGES - 1 steps ahead
    # (Triton's pipeliner, tl.range(num_stages)); the value loads (2 bytes at a running pointer) stay
    # register loads. Split-K (grid axis 1); 32-bit value indices (the launcher checks nnz and N * words).
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    SPLIT_K = tl.num_programs(1)
    k_lo, k_hi = split_k_range(K, pid_s, SPLIT_K, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    n_words = (K + 31) // 32
    w_hi = (k_hi + 31) // 32
    row_start = tl.load(row_ptr + offs_n, mask=n_mask, other=0).to(tl.int32)[:, None]  # [BN, 1]
    wi = tl.max_contiguous(tl.arange(0, BLOCK_K // 32), 1)  # one word per lane: no vector loads along K
    rows = (offs_n * n_words)[:, None]  # [BN, 1] int32
    pairs_ptr = offsets_ptr.to(tl.pointer_type(tl.int32), bitcast=True)  # int16 offsets, two per int32
    x_rows = x_ptr + tl.minimum(offs_m, M - 1) * stride_xm  # rows past M read row M - 1 (never stored)
    one = (N >= 0).to(tl.int32)  # 1, opaque to the compiler (see _count_loop)
    acc = _count_loop(x_rows, bitmap_ptr, pairs_ptr, values_ptr, row_start, rows, n_mask, wi, k_lo, k_hi, w_hi,
                      K, one, EVEN_K, GUARD, BLOCK_M, BLOCK_N, BLOCK_K, NUM_STAGES)
    store_split_k(tl.sum(acc, axis=2), y_ptr, ws_ptr, lock_ptr, bias_ptr, offs_m, offs_n, M, N, stride_ym, pid_s,
                  pid_m * tl.num_programs(0) + pid_n, SPLIT_K, HAS_BIAS)


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


@triton.jit
def _unpack_bitmap_kernel(bitmap_ptr, offsets_ptr, values_ptr, row_ptr, out_ptr, N, K,
                          HW_POPC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Dense W [N, K] (zeros at the dropped inputs) for the prefill fallback (cuBLAS on the unpacked weight).
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    BW: tl.constexpr = BLOCK_K // 32
    w = tl.program_id(1) * BW + tl.arange(0, BW)
    row_start = tl.load(row_ptr + offs_n, mask=offs_n < N, other=0)  # [BN] int64
    wt = _expand_bitmap(bitmap_ptr, offsets_ptr, values_ptr, row_start, offs_n, w, N, K, HW_POPC)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n < N)[:, None] & (k < K)[None, :]
    tl.store(out_ptr + offs_n.to(tl.int64)[:, None] * K + k[None, :], wt, mask=mask)


def unpack_bitmap_triton(packed: PackedBitmap) -> torch.Tensor:
    """Dense [N, K] weight of a bitmap pack (as ``formats.unpack_bitmap``, bit for bit), by one Triton launch
    (no boolean indexing, so no device-to-host sync)."""
    n, k = packed.shape
    check_triton_device(packed.values)
    if packed.nnz == 0:
        return torch.zeros(n, k, dtype=packed.dtype, device=packed.device)
    offsets = packed.word_offsets if packed.word_offsets is not None else bitmap_word_offsets(packed.bitmap)
    out = torch.empty(n, k, dtype=packed.dtype, device=packed.device)
    bn, bk = (16, 64) if interpreter_enabled() else (32, 256)
    _unpack_bitmap_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk))](
        packed.bitmap, offsets, packed.values, packed.row_ptr, out, n, k, HW_POPC=not interpreter_enabled(),
        BLOCK_N=bn, BLOCK_K=bk)
    return out


# Autotuned entry points (one tuning per weight shape and row bucket); the raw kernels take explicit tiles.
_gemv_bitmap_tuned = triton.autotune(configs=_gemv_configs(), key=["N", "K", "BLOCK_M"], do_bench=autotune_bench)(
    _gemv_bitmap_kernel
)
_gemv_bitmap_rows_tuned = triton.autotune(configs=_rows_configs(), key=["N", "K", "BLOCK_M"],
                                          do_bench=autotune_bench)(_gemv_bitmap_kernel)
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
    y, b = gemv_output(x2, n, bias)  # [M, N]; b: y as a dummy pointer when no bias
    if m == 0 or packed.nnz == 0:
        fill_bias(y, bias)
        return y.reshape(*x.shape[:-1], n)
    offsets = packed.word_offsets if packed.word_offsets is not None else bitmap_word_offsets(packed.bitmap)
    kind = choose_path(path, m)
    if kind == "gemv":
        if packed.nnz >= 2**31 or n * packed.bitmap.shape[1] >= 2**31:
            raise ValueError("the bitmap gemv kernel uses 32-bit offsets: nnz and N * K / 32 must be < 2**31")
        ptrs, rest = (x2, packed.bitmap, offsets, packed.values, packed.row_ptr, b, y), (m, n, k, x2.stride(0), y.stride(0))
        # every row count up to 8 a program: walk each word with a running pointer (M = 1 and M = 2..8 keep
        # separate autotune candidates: a thread's accumulators grow with the rows of x)
        one_row = (config.block_m if config else m) == 1
        shapes = [(16, 64)] if interpreter_enabled() else GEMV_SHAPES if one_row else ROWS_SHAPES
        flat = offsets.reshape(-1)
        if flat.numel() % 2 or flat.data_ptr() % 4:  # read as int32 pairs: even length, 4-byte aligned
            flat = torch.cat([flat, flat.new_zeros(flat.numel() % 2)])
        ptrs = (x2, packed.bitmap, flat, packed.values, packed.row_ptr, b, y)
        launch_gemv(_gemv_bitmap_kernel, _gemv_bitmap_tuned if one_row else _gemv_bitmap_rows_tuned, shapes, ptrs,
                    rest, m, n, k, x.device, config, HAS_BIAS=bias is not None, EVEN_K=k % 32 == 0,
                    GUARD=not values_have_tail(packed.values))
        return y.reshape(*x.shape[:-1], n)
    args = (x2, packed.bitmap, offsets, packed.values, packed.row_ptr, b, y, m, n, k, x2.stride(0), y.stride(0))
    launch_tiled(_gemv_bitmap_kernel, _gemv_bitmap_tuned, _dot_bitmap_kernel, _dot_bitmap_tuned, args,
                 kind, m, n, config, HAS_BIAS=bias is not None,
                 HW_POPC=not interpreter_enabled(), IEEE_FP32=x.dtype == torch.float32)
    return y.reshape(*x.shape[:-1], n)
