"""When does a CSR matmul beat dense on this CPU? The measurement behind ElasticLinear's CSR rule.

    python benchmarks/bench_cpu_sparse.py

Times y = x @ W.T for the embedded model's linear shapes (896x384, 384x896), M rows of x, dense
`F.linear` vs `torch.sparse.mm` on a CSR copy of W at 70/80/90% random sparsity, fp32, one thread,
median of 200 calls after 10 warm-ups. Writes the `cpu-sparse` section of docs/benchmarks.md.
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


def _time_us(fn, n: int = 200) -> float:
    for _ in range(10):
        fn()
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1e6


def main() -> int:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    lines = ["| shape (N x K) | M | dense us | " + " | ".join(f"CSR {int(s * 100)}% (speedup)" for s in SPARSITIES)
             + " |", "|---|---|---|" + "---|" * len(SPARSITIES)]
    for n, k in SHAPES:
        w = torch.randn(n, k, generator=g)
        csrs = [(w * (torch.rand(n, k, generator=g) >= s)).to_sparse_csr() for s in SPARSITIES]
        for m in ROWS:
            x = torch.randn(m, k, generator=g)
            dense = _time_us(lambda: F.linear(x, w))
            cells = []
            for csr in csrs:
                t = _time_us(lambda: torch.sparse.mm(csr, x.T))
                cells.append(f"{t:.1f} ({dense / t:.2f}x)")
            lines.append(f"| {n}x{k} | {m} | {dense:.1f} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    body = f"""## CPU: CSR vs dense matmul

Measured by `python benchmarks/bench_cpu_sparse.py` on {machine()} (timed with 1 thread).

{chr(10).join(lines)}

The torch backend keeps a CSR copy of tiers at >= 80% sparsity on CPU and uses it for batches of at least
16 rows (80%) or 8 rows (90% and up), where this table shows CSR ahead; smaller batches use the dense
masked weight.
"""
    write_section(DOCS / "benchmarks.md", "cpu-sparse", body, "Benchmarks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
