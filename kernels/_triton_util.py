"""Triton helpers shared by the kernel files (imports triton: load only where kernels run)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import triton


def autotune_bench(kernel_call: Callable[[], object], quantiles: Sequence[float]) -> list[float]:
    """Shorter autotune timing than Triton's default (25 ms warmup, 100 ms reps) per config.

    Kernels here run for microseconds, so 5 ms / 25 ms still gives hundreds of L2-flushed repetitions.
    """
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=list(quantiles))
