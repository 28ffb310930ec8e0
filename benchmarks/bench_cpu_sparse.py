"""How should a CPU store and multiply the served weights? The measurements behind `linear.serving_layout`
and ElasticLinear's CSR rule.

    python benchmarks/bench_cpu_sparse.py

Times y = x @ W.T (`F.linear`) for the embedded model's linear shapes, M rows of x, fp32, one thread,
median of 200 calls after 10 warm-ups:
1. layout: W stored row-major ([out, in] contiguous, as checkpoints store it) vs column-major (a transposed
   view of a contiguous [in, out] tensor: the same values, another BLAS kernel);
2. sparsity: `torch.sparse.mm` on a CSR copy of W at 70/80/90% random sparsity vs the dense column-major W.
Writes the `cpu-sparse` section of docs/benchmarks.md.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import DOCS, machine, write_section  # noqa: E402

SHAPES = [(896, 384), (384, 896)]
ROWS = [1, 8, 16, 32, 64]
SPARSITIES = [0.7, 0.8, 0.9]
LAYOUT_SHAPES = [(384, 384), (896, 384), (384, 896), (6144, 384)]  # attention, MLP up/gate, down, LM head
LAYOUT_ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 512]


def _time_us(fn, n: int = 200) -> float:
    for _ in range(10):
        fn()
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1e6


def layout_table(g: torch.Generator) -> list[str]:
    lines = ["| dtype | shape (N x K) | " + " | ".join(f"M={m}" for m in LAYOUT_ROWS) + " |",
             "|---|---|" + "---|" * len(LAYOUT_ROWS)]
    for dtype in (torch.float32, torch.bfloat16):
        for n, k in LAYOUT_SHAPES:
            w = torch.randn(n, k, generator=g).to(dtype)
            w_col = w.t().contiguous().t()
            cells = []
            for m in LAYOUT_ROWS:
                x = torch.randn(m, k, generator=g).to(dtype)
                row, col = _time_us(lambda: F.linear(x, w)), _time_us(lambda: F.linear(x, w_col))
                cells.append(f"{row:.0f} / {col:.0f} ({row / col:.2f}x)")
            lines.append(f"| {str(dtype).removeprefix('torch.')} | {n}x{k} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    return lines


def csr_table(g: torch.Generator) -> list[str]:
    lines = ["| shape (N x K) | M | dense us | " + " | ".join(f"CSR {int(s * 100)}% (speedup)" for s in SPARSITIES)
             + " |", "|---|---|---|" + "---|" * len(SPARSITIES)]
    for n, k in SHAPES:
        w = torch.randn(n, k, generator=g)
        w_col = w.t().contiguous().t()
        csrs = [(w * (torch.rand(n, k, generator=g) >= s)).to_sparse_csr() for s in SPARSITIES]
        for m in ROWS:
            x = torch.randn(m, k, generator=g)
            dense = _time_us(lambda: F.linear(x, w_col))
            cells = []
            for csr in csrs:
                t = _time_us(lambda: torch.sparse.mm(csr, x.T))
                cells.append(f"{t:.1f} ({dense / t:.2f}x)")
            lines.append(f"| {n}x{k} | {m} | {dense:.1f} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    return lines


def main() -> int:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    layout, csr = layout_table(g), csr_table(g)
    body = f"""## CPU: weight layout, and CSR vs dense matmul

Measured by `python benchmarks/bench_cpu_sparse.py` on {machine()} (timed with 1 thread).

### Weight layout

Microseconds of `F.linear(x, W)` with W row-major / column-major (speedup of column-major), hot cache:

{chr(10).join(layout)}

The engine serves CPU fp32 weights column-major (`linear.serving_layout`, no extra memory), for the rows a
decode step has (4-32 per step); see the table for where it gains and where it does not. bf16 stays
row-major.

### CSR vs dense

Dense is the served (column-major) weight:

{chr(10).join(csr)}

The torch backend keeps a CSR copy of tiers at >= 80% sparsity on CPU and uses it for batches of at least
`linear._csr_min_rows` rows, where this table shows CSR ahead; smaller batches use the dense masked weight.
"""
    write_section(DOCS / "benchmarks.md", "cpu-sparse", body, "Benchmarks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
