"""Triton helpers shared by the kernel files (imports triton: load only where kernels run)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import triton
import triton.language as tl

from ._launch import NUM_SMS, choose_split_k, next_power_of_2, split_k_buffers

# Two waves: while a gemv grid has fewer programs than this, split_k_grid splits K further, down to one K step
# a split (a short split costs one more fp32 partial; an idle SM costs its share of the bandwidth).
SPLIT_K_MIN_PROGRAMS = 2 * NUM_SMS
SPLIT_K_WAVES_MAX = 32


def autotune_bench(kernel_call: Callable[[], object], quantiles: Sequence[float]) -> list[float]:
    """Shorter autotune timing than Triton's default (25 ms warmup, 100 ms reps) per config.

    Kernels here run for microseconds, so 5 ms / 25 ms still gives hundreds of L2-flushed repetitions.
    """
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=list(quantiles))


@triton.jit
def popcount32(v, HW_POPC: tl.constexpr):
    """Set bits of each int32 element (int32 result).

    HW_POPC: the PTX ``popc`` instruction (GPU); else a SWAR count on uint32 (Triton's CPU interpreter runs
    no inline assembly). Both give the same numbers.
    """
    if HW_POPC:
        return tl.inline_asm_elementwise("popc.b32 $0, $1;", "=r,r", [v], dtype=tl.int32, is_pure=True, pack=1)
    u = v.to(tl.uint32, bitcast=True)
    u = u - ((u >> 1) & 0x55555555)
    u = (u & 0x33333333) + ((u >> 2) & 0x33333333)
    u = (u + (u >> 4)) & 0x0F0F0F0F
    return ((u * 0x01010101) >> 24).to(tl.int32)


def split_k_grid(n: int, m: int, k: int, block_m: int, block_n: int, block_k: int) -> tuple[int, int, int]:
    """GEMV grid (N tiles, K splits, M tiles): the kernels read SPLIT_K as tl.num_programs(1).

    K splits: ``choose_split_k``'s (>= 2 K steps a split), then doubled while the grid is under two waves
    (SPLIT_K_MIN_PROGRAMS) and every split keeps >= 1 K step, up to SPLIT_K_WAVES_MAX."""
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    split = choose_split_k(tiles, k, block_k)
    steps = triton.cdiv(k, block_k)
    while tiles * split < SPLIT_K_MIN_PROGRAMS and split < SPLIT_K_WAVES_MAX and steps >= 2 * split:
        split *= 2
    return triton.cdiv(n, block_n), split, triton.cdiv(m, block_m)


def prune_under_two_waves(configs: list, named_args: dict, **kwargs: object) -> list:
    """``early_config_prune`` of the split-K gemv autotuners: drop the configs whose grid (``split_k_grid``
    with the config's BLOCK_N and BLOCK_K) stays under SPLIT_K_MIN_PROGRAMS (two programs per SM) on this
    launch's N, K, M while some config reaches it (else keep every config)."""
    n, k, m = named_args["N"], named_args["K"], named_args["M"]
    block_m = kwargs.get("BLOCK_M", named_args.get("BLOCK_M"))

    def programs(c) -> int:
        gn, gs, gm = split_k_grid(n, m, k, block_m, c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"])
        return gn * gs * gm

    kept = [c for c in configs if programs(c) >= SPLIT_K_MIN_PROGRAMS]
    return kept or list(configs)


def launch_gemv(kernel, tuned, shapes, ptrs, rest, m, n, k, device, config, block_m=None, step_k=None,
                inner="BLOCK_K", **flags) -> None:
    """Launch a split-K gemv kernel ``kernel(*ptrs, ws, locks, *rest, **flags, BLOCK_M, BLOCK_N, <inner>)``:
    autotuned over `shapes` [(BLOCK_N, BLOCK_K, ...)] when config is None, else with that tile (and its
    split_k, or the heuristic's). BLOCK_M = block_m, else config's, else all rows up to 8, so the weight is
    read once for decode.

    step_k: the K step split-K counts in, when it is fixed by the format (a format tile of the cols and
    nested kernels) rather than the config's BLOCK_K. inner: the constexpr a config's block_k sets (BLOCK_K;
    BLOCK_V / BLOCK_J for the entries a step of the cols / nested kernels; None: the kernel has none).
    NUM_STAGES (the K loop's ``tl.range(num_stages)``) gets config.num_stages when the kernel takes it."""
    block_m = block_m or (config.block_m if config else min(next_power_of_2(m), 8))
    if config is not None:
        grid = split_k_grid(n, m, k, block_m, config.block_n, step_k or config.block_k)
        if config.split_k is not None:
            grid = (grid[0], config.split_k, grid[2])
        ws, locks = split_k_buffers(m, n, grid[1], grid[0] * grid[2], device)
        if "NUM_STAGES" in kernel.arg_names:  # the K loop's tl.range(num_stages): cp.async stages
            flags = {**flags, "NUM_STAGES": config.num_stages}
        if inner is not None:
            flags = {**flags, inner: config.block_k}
        kernel[grid](*ptrs, ws, locks, *rest, BLOCK_M=block_m, BLOCK_N=config.block_n,
                     num_warps=config.num_warps, num_stages=config.num_stages, **flags)
        return
    grids = [split_k_grid(n, m, k, block_m, bn, step_k or bk) for bn, bk, *_ in shapes]
    ws, locks = split_k_buffers(m, n, max(g[1] for g in grids), max(g[0] * g[2] for g in grids), device)
    grid = lambda meta: split_k_grid(n, m, k, block_m, meta["BLOCK_N"], step_k or meta["BLOCK_K"])
    tuned[grid](*ptrs, ws, locks, *rest, BLOCK_M=block_m, **flags)


def launch_tiled(gemv, gemv_tuned, dot, dot_tuned, args, kind, m, n, config, IEEE_FP32, **flags) -> None:
    """Launch the gemv or dot kernel of a format: autotuned when config is None, else with that tile.

    gemv grid: (N blocks, M blocks) with BLOCK_M = all rows up to 8, so the weight is read once for decode.
    dot grid: one axis, M blocks fastest, so programs sharing a weight tile run together (L2 reuse).
    """
    if kind == "gemv":
        block_m = config.block_m if config else min(next_power_of_2(m), 8)
        if config is None:
            grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, block_m))
            gemv_tuned[grid](*args, BLOCK_M=block_m, **flags)
        else:
            grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, block_m))
            gemv[grid](*args, BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                       num_warps=config.num_warps, num_stages=config.num_stages, **flags)
        return
    m_bucket = min(next_power_of_2(m), 256)
    if config is None:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        dot_tuned[grid](*args, m_bucket, IEEE_FP32=IEEE_FP32, **flags)
    else:
        grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n),)
        dot[grid](*args, m_bucket, IEEE_FP32=IEEE_FP32, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                  BLOCK_K=config.block_k, num_warps=config.num_warps, num_stages=config.num_stages, **flags)


@triton.jit
def split_k_range(K, pid_s, SPLIT_K, BLOCK_K: tl.constexpr):
    """The K range [k_lo, k_hi) of split `pid_s` of SPLIT_K: its own run of whole BLOCK_K steps."""
    k_chunk = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_lo = pid_s * k_chunk
    return k_lo, tl.minimum(K, k_lo + k_chunk)


@triton.jit
def store_split_k(acc, y_ptr, ws_ptr, lock_ptr, bias_ptr, offs_m, offs_n, M, N, stride_ym, pid_s, lock_id,
                  SPLIT_K, HAS_BIAS: tl.constexpr):
    """Store acc [BLOCK_M, BLOCK_N] (fp32) of split pid_s; with SPLIT_K > 1 the last split to finish sums all.

    SPLIT_K is a runtime value (the grid's split axis), so one compiled kernel serves every split.
    Split-K, deterministic and in one launch: every split writes its fp32 partial to ws [SPLIT_K, M, N], then
    bumps the tile's counter lock_ptr[lock_id] (acq_rel, after a CTA barrier so all threads' stores are in,
    the CUTLASS semaphore pattern); the split that sees SPLIT_K - 1 adds the partials in split order (the
    same sum every run), adds the bias, stores y and resets the counter to 0 for the next launch.
    """
    m_mask = offs_m < M
    n_mask = offs_n < N
    y_mask = m_mask[:, None] & n_mask[None, :]
    y_off = offs_m[:, None] * stride_ym + offs_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:
        ws_off = offs_m[:, None] * N + offs_n[None, :]
        tl.store(ws_ptr + pid_s * M * N + ws_off, acc, mask=y_mask)
        tl.debug_barrier()
        count = tl.atomic_add(lock_ptr + lock_id, 1, sem="acq_rel")
        if count == SPLIT_K - 1:
            total = tl.load(ws_ptr + ws_off, mask=y_mask, other=0.0, cache_modifier=".cg")
            for s in range(1, SPLIT_K):
                total += tl.load(ws_ptr + s * M * N + ws_off, mask=y_mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + y_off, total.to(y_ptr.dtype.element_ty), mask=y_mask)
            tl.atomic_xchg(lock_ptr + lock_id, 0)


@triton.jit
def gather_load(ptrs, HW_LOAD: tl.constexpr, X_BITS: tl.constexpr):
    """The read-only values at `ptrs` (a gather of X_BITS-bit elements, 16 or 32). HW_LOAD: one
    ``ld.global.nc`` per element as inline PTX, which keeps the layout of `ptrs` (a tl.load gather gets a
    layout of its own from Triton's coalescing, and converting the index tile to it costs shared-memory round
    trips and barriers per step); else tl.load (Triton's CPU interpreter runs no inline assembly). Both load
    the same values."""
    if HW_LOAD:
        a = ptrs.to(tl.int64, bitcast=True)
        if X_BITS == 16:
            return tl.inline_asm_elementwise("ld.global.nc.b16 $0, [$1];", "=h,l", [a],
                                             dtype=ptrs.dtype.element_ty, is_pure=True, pack=1)
        return tl.inline_asm_elementwise("ld.global.nc.b32 $0, [$1];", "=r,l", [a],
                                         dtype=ptrs.dtype.element_ty, is_pure=True, pack=1)
    return tl.load(ptrs)
