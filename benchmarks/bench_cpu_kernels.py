"""CPU kernels per packed format at 1-32 rows: the measurements behind engine/linear.py's format choice.

Two layers of the 483M Llama's projections (q, k, v, o, gate, up, down: hidden 2048, ffn 5632, 4 KV heads of
64; 88M weights, 176 MB as bf16, well beyond L3), random weights, random masks. Per format, the time of one
`cpu_linear` call over all 14 matrices (the weights stream from DRAM as at decode), interleaved format by
format, best of --reps; the ratio to the bf16 dense kernel and the GB/s of the format's bytes.

    .venv/bin/python benchmarks/bench_cpu_kernels.py --threads 1 --rows 1,4,8,32
    SPARSEDIAL_CPU_ISA=avx2 .venv/bin/python benchmarks/bench_cpu_kernels.py      # the AVX2 path
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine
from sparsedial.kernels import _cpu_ext
from sparsedial.kernels.cpu_dispatch import cpu_linear
from sparsedial.kernels.cpu_formats import pack_bitmask, pack_cols_bf16, pack_dense_bf16

SHAPES = [(2048, 2048), (256, 2048), (256, 2048), (2048, 2048), (5632, 2048), (5632, 2048), (2048, 5632)]


def mask24(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    idx = torch.rand(n, k // 4, 4, generator=g).argsort(-1)[..., :2]
    return torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(2, idx, True).reshape(n, k)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", default="1,4,8,32")
    ap.add_argument("--sparsity", default="0.3,0.5,0.7,0.9", help="unstructured sparsities (bitmask; tiled >= 0.7)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--fp32", action="store_true", help="also fp32 MKL F.linear on the dense weights")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(n, k, generator=g) * 0.02 for _ in range(2) for n, k in SHAPES]
    formats: dict[str, list] = {"bf16 dense": [pack_dense_bf16(w) for w in weights]}
    if args.fp32:
        formats["fp32 MKL"] = weights
    for s in (float(v) for v in args.sparsity.split(",")):
        masks = [torch.rand(w.shape, generator=g) >= s for w in weights]
        formats[f"bitmask {s:.0%}"] = [pack_bitmask(w, m) for w, m in zip(weights, masks, strict=True)]
        if s >= 0.7:
            formats[f"tiled {s:.0%}"] = [pack_cols_bf16(w, m) for w, m in zip(weights, masks, strict=True)]
    formats["bitmask 2:4"] = [pack_bitmask(w, mask24(*w.shape, g)) for w in weights]

    def nbytes(p) -> int:
        return p.numel() * p.element_size() if isinstance(p, torch.Tensor) else p.nbytes

    print(f"{machine()}; ISA path {_cpu_ext.isa()}; {args.threads} thread(s); 14 matrices, "
          f"{sum(w.numel() for w in weights) / 1e6:.0f}M weights; best of {args.reps}")
    for m in (int(v) for v in args.rows.split(",")):
        xs = {k: torch.randn(m, k, generator=g) for k in (2048, 5632)}
        best: dict[str, float] = {}
        for _ in range(args.reps):
            for name, packed in formats.items():
                t = time.perf_counter()
                for p in packed:
                    x = xs[p.shape[1]]
                    F.linear(x, p) if isinstance(p, torch.Tensor) else cpu_linear(x, p)
                best[name] = min(best.get(name, 1e9), time.perf_counter() - t)
        base = best["bf16 dense"]
        print(f"\n{m} row(s) of x\n| format | ms | vs bf16 dense | GB/s of its bytes | MB |\n|---|---|---|---|---|")
        for name, t in best.items():
            mb = sum(nbytes(p) for p in formats[name]) / 1e6
            print(f"| {name} | {t * 1e3:.2f} | {base / t:.2f}x | {mb / 1e3 / t:.1f} | {mb:.0f} |")


if __name__ == "__main__":
    main()
