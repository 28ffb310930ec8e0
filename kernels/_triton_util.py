"""Triton helpers shared by the kernel files (imports triton: load only where kernels run)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import triton
import triton.language as tl

from ._launch import next_power_of_2


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
