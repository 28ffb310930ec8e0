"""How fast are the sparse linear kernels against dense cuBLAS and torch's 2:4, per real model shape?

GPU mode (CUDA present): for Llama-2-7B / Llama-3-8B linear shapes and M in {1..128} rows, times fp16
  * dense ``F.linear`` (cuBLAS),
  * torch ``to_sparse_semi_structured`` 2:4 ("n/a" when it fails),
  * our Triton 2:4 and bitmap (50%, 70%, ...) kernels (``sparse_linear``),
  * our torch reference (unpack + F.linear) for 2:4,
with ``triton.testing.do_bench`` (L2 flushed before every repetition, median). Reports microseconds,
achieved GB/s (packed weight + x + y bytes / time), fraction of the peak bandwidth measured in the same
run by a device-to-device copy, speedup vs dense, and the byte ceiling of that speedup.
CPU mode (no CUDA): the torch reference vs dense F.linear on small shapes; GPU columns "not measured".

Writes <out>/bench_kernels_<gpu|cpu>.csv and .md.  Usage:
    python benchmarks/bench_kernels.py [--quick] [--paths] [--out docs]
"""

from __future__ import annotations

import argparse
import csv
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from sparsedial.kernels import pack_24, pack_bitmap, sparse_linear

SHAPES = {  # name: (N = out features, K = in features)
    "llama2-7b qkvo 4096x4096": (4096, 4096),
    "llama2-7b up/gate 11008x4096": (11008, 4096),
    "llama2-7b down 4096x11008": (4096, 11008),
    "llama3-8b up/gate 14336x4096": (14336, 4096),
    "llama3-8b down 4096x14336": (4096, 14336),
    "llama3-8b kv 1024x4096": (1024, 4096),
}
M_VALUES = [1, 2, 4, 8, 16, 32, 128]
BITMAP_SPARSITIES = [0.5, 0.7]


@dataclass
class Row:
    device: str
    shape: str
    n: int
    k: int
    m: int
    method: str
    us: float | None  # None = not measured / n/a
    gbps: float | None
    frac_peak_bw: float | None
    speedup_vs_dense: float | None
    byte_ceiling: float | None  # dense bytes / this method's bytes
    max_rel_err: float | None
    note: str = ""


def time_cpu(fn: Callable[[], object], rep_ms: int) -> float:
    """Median microseconds of fn() on the CPU."""
    fn()
    times: list[float] = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while time.perf_counter() < deadline or len(times) < 3:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e6 * sorted(times)[len(times) // 2]


def time_gpu(fns: list[Callable[[], object]], replays: int = 15) -> tuple[float, str]:
    """Median microseconds per call, cycling through fns (one per weight set, so L2 holds none of them).

    The calls are captured in a CUDA graph (as a serving engine runs decode) and the graph is replayed
    between CUDA events; the median replay over the number of calls gives the time. Falls back to an
    eager loop (CPU launch overhead included) when capture fails.
    """
    for f in fns:
        f()  # warm-up: compiles and autotunes outside the capture
    torch.cuda.synchronize()
    inner = max(1, 24 // len(fns))
    mode = "graph"
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(inner):
                for f in fns:
                    f()
        run = graph.replay
    except Exception:  # noqa: BLE001 -- e.g. a library call that cannot be captured
        torch.cuda.synchronize()
        mode = "eager"

        def run() -> None:
            for _ in range(inner):
                for f in fns:
                    f()

    run()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return 1e3 * sorted(times)[len(times) // 2] / (inner * len(fns)), mode


def peak_bandwidth_gbps() -> float:
    """Device-to-device copy of 1 GiB: (read + write bytes) / median time."""
    import triton

    src = torch.empty(2**29, dtype=torch.float16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")
    return 2 * src.numel() * 2 / (ms * 1e-3) / 1e9


def random_24_mask(n: int, k: int, device: str) -> torch.Tensor:
    keep = torch.rand(n, k // 4, 4, device=device).argsort(dim=-1)[..., :2]
    return torch.zeros(n, k // 4, 4, dtype=torch.bool, device=device).scatter_(2, keep, True).reshape(n, k)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


@dataclass
class WeightSet:
    """One copy of every weight variant of a shape; several sets rotate so that L2 never serves a call."""

    w: torch.Tensor  # dense [N, K]
    p24: object
    torch_24: object | None
    bitmaps: dict[float, object]


def make_sets(n: int, k: int, count: int, dev: str, dtype: torch.dtype) -> tuple[list[WeightSet], dict, str]:
    """`count` weight sets, plus the masked dense weights of set 0 (for error checks) and a torch-2:4 note."""
    sets, refs, note = [], {}, ""
    for i in range(count):
        w = (torch.randn(n, k, device=dev) / math.sqrt(k)).to(dtype)
        mask24 = random_24_mask(n, k, dev)
        w24 = torch.where(mask24, w, torch.zeros_like(w))
        torch_24 = None
        if dev == "cuda" and not note:
            try:
                from torch.sparse import to_sparse_semi_structured

                torch_24 = to_sparse_semi_structured(w24)
            except Exception as exc:  # noqa: BLE001 -- report any failure as n/a
                note = f"n/a: {type(exc).__name__}: {exc}"[:120]
        bitmaps = {}
        for s in BITMAP_SPARSITIES:
            mask = torch.rand(n, k, device=dev) >= s
            bitmaps[s] = pack_bitmap(w, mask)
            if i == 0:
                refs[s] = torch.where(mask, w, torch.zeros_like(w))
        if i == 0:
            refs["24"] = w24
        sets.append(WeightSet(w, pack_24(w, mask24), torch_24, bitmaps))
    return sets, refs, note


def bench_shape(
    name: str, n: int, k: int, ms: list[int], cuda: bool, peak: float | None, rep_ms: int, paths: bool
) -> list[Row]:
    dev = "cuda" if cuda else "cpu"
    dtype = torch.float16 if cuda else torch.float32  # CPU fp16 matmul is not a meaningful baseline
    esize = torch.finfo(dtype).bits // 8
    dense_bytes = n * k * esize
    # Rotate through enough sets that the smallest format (bitmap 70%, ~0.37 of dense) spans > 2x L2.
    count = min(12, max(2, math.ceil(120e6 / (0.37 * dense_bytes)))) if cuda else 1
    sets, refs, note_24 = make_sets(n, k, count, dev, dtype)
    rows: list[Row] = []
    for m in ms:
        xs = [torch.randn(m, k, device=dev).to(dtype) for _ in sets]
        io_bytes = (m * k + m * n) * esize

        def add(method: str, make: Callable[[WeightSet, torch.Tensor], Callable[[], torch.Tensor]] | None,
                wbytes: int, ref_w: torch.Tensor | None, note: str = "", gpu_only: bool = False) -> None:
            # add() runs inside this loop iteration only, so reading m / xs / io_bytes here is safe.
            base = {"device": dev, "shape": name, "n": n, "k": k, "m": m,  # noqa: B023
                    "method": method, "byte_ceiling": dense_bytes / wbytes}
            if make is None or (gpu_only and not cuda):
                rows.append(Row(**base, us=None, gbps=None, frac_peak_bw=None, speedup_vs_dense=None,
                                max_rel_err=None, note=note or "not measured"))
                return
            fns = [make(ws, x) for ws, x in zip(sets, xs, strict=True)]  # noqa: B023
            try:
                err = rel_err(fns[0](), F.linear(xs[0], ref_w)) if ref_w is not None else None  # noqa: B023
                us, mode = time_gpu(fns) if cuda else (time_cpu(fns[0], rep_ms), "eager")
            except Exception as exc:  # noqa: BLE001 -- a failing baseline is reported, not fatal
                rows.append(Row(**base, us=None, gbps=None, frac_peak_bw=None, speedup_vs_dense=None,
                                max_rel_err=None, note=f"n/a: {type(exc).__name__}: {exc}"[:120]))
                return
            gbps = (wbytes + io_bytes) / (us * 1e-6) / 1e9  # noqa: B023
            rows.append(Row(**base, us=us, gbps=gbps, frac_peak_bw=gbps / peak if peak else None,
                            speedup_vs_dense=None, max_rel_err=err, note=(note + " " + mode).strip()))

        p24, bms = sets[0].p24, sets[0].bitmaps
        add("dense F.linear", lambda ws, x: lambda: F.linear(x, ws.w), dense_bytes, sets[0].w)
        add("torch 2:4 (semi_structured)",
            (lambda ws, x: lambda: F.linear(x, ws.torch_24)) if sets[0].torch_24 is not None else None,
            p24.nbytes, refs["24"], note_24, gpu_only=True)
        add("ours 2:4", lambda ws, x: lambda: sparse_linear(x, ws.p24), p24.nbytes, refs["24"], gpu_only=True)
        add("ours 2:4 reference (unpack+F.linear)",
            lambda ws, x: lambda: sparse_linear(x, ws.p24, backend="torch"), p24.nbytes, refs["24"])
        # The gemv/dot crossover: time both kernels where auto could pick either.
        compare = paths and cuda and 4 <= m <= 32
        for path in ("gemv", "dot") if compare else ():
            add(f"ours 2:4 [{path}]", lambda ws, x, path=path: lambda: sparse_linear(x, ws.p24, path=path),
                p24.nbytes, refs["24"])
        for s in BITMAP_SPARSITIES:
            label = f"ours bitmap {int(100 * s)}%"
            add(label, lambda ws, x, s=s: lambda: sparse_linear(x, ws.bitmaps[s]), bms[s].nbytes, refs[s],
                gpu_only=True)
            if not cuda:
                add(f"{label} reference", lambda ws, x, s=s: lambda: sparse_linear(x, ws.bitmaps[s]),
                    bms[s].nbytes, refs[s])
            for path in ("gemv", "dot") if compare else ():
                add(f"{label} [{path}]",
                    lambda ws, x, s=s, path=path: lambda: sparse_linear(x, ws.bitmaps[s], path=path),
                    bms[s].nbytes, refs[s])
        this_m = [r for r in rows if r.m == m]
        dense_us = this_m[0].us  # "dense F.linear" is added first
        for r in this_m:
            if r.us and dense_us:
                r.speedup_vs_dense = dense_us / r.us
        print(f"  {name} M={m}: " + ", ".join(f"{r.method}={fmt(r.us, '.1f')}" for r in this_m), flush=True)
    return rows


def fmt(v: float | None, spec: str) -> str:
    return "not measured" if v is None else format(v, spec)


def write_outputs(rows: list[Row], out: Path, tag: str, header: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"bench_kernels_{tag}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    columns = ("| shape (N x K) | M | method | us | GB/s | frac peak BW | speedup vs dense | byte ceiling "
               "| rel err | note |")
    lines = [header, "", columns, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r.shape} | {r.m} | {r.method} | {fmt(r.us, '.1f')} | {fmt(r.gbps, '.0f')} | "
            f"{fmt(r.frac_peak_bw, '.2f')} | {fmt(r.speedup_vs_dense, '.2f')}x | {r.byte_ceiling:.2f}x | "
            f"{fmt(r.max_rel_err, '.1e')} | {r.note} |"
        )
    (out / f"bench_kernels_{tag}.md").write_text("\n".join(lines) + "\n")


def summary(rows: list[Row]) -> str:
    """Geometric-mean speedup vs dense per method, over decode (M <= 8) and over M >= 16."""
    out = ["| method | geomean speedup M<=8 | geomean speedup M>=16 | min M<=8 | max M<=8 |", "|---|---|---|---|---|"]
    for method in dict.fromkeys(r.method for r in rows):
        cols = []
        for sel in (lambda m: m <= 8, lambda m: m >= 16):
            v = [r.speedup_vs_dense for r in rows if r.method == method and sel(r.m) and r.speedup_vs_dense]
            cols.append(math.exp(sum(map(math.log, v)) / len(v)) if v else None)
        dec = [r.speedup_vs_dense for r in rows if r.method == method and r.m <= 8 and r.speedup_vs_dense]
        out.append(f"| {method} | {fmt(cols[0], '.2f')} | {fmt(cols[1], '.2f')} | "
                   f"{fmt(min(dec) if dec else None, '.2f')} | {fmt(max(dec) if dec else None, '.2f')} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two shapes, M in {1, 8, 32}")
    parser.add_argument("--paths", action="store_true", help="also time the gemv and dot kernels separately")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="folder for the CSV and markdown")
    parser.add_argument("--rep-ms", type=int, default=40, help="timing budget per measurement (ms)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    if cuda:
        gpu = torch.cuda.get_device_name()
        peak = peak_bandwidth_gbps()
        shapes = dict(list(SHAPES.items())[:2]) if args.quick else SHAPES
        ms = [1, 8, 32] if args.quick else M_VALUES
        import triton

        machine = (f"GPU: {gpu}; torch {torch.__version__}, triton {triton.__version__}; measured peak bandwidth "
                   f"(1 GiB device-to-device copy, read+write) {peak:.0f} GB/s")
    else:
        peak = None
        shapes = {"small 1024x1024": (1024, 1024), "small 2048x1024": (2048, 1024)}
        ms = [1, 8]
        machine = (f"CPU only ({platform.processor() or platform.machine()}, torch {torch.__version__}, fp32): "
                   "GPU kernels not measured")
    print(machine, flush=True)
    rows: list[Row] = []
    for name, (n, k) in shapes.items():
        rows += bench_shape(name, n, k, ms, cuda, peak, args.rep_ms, args.paths)
        header = f"# Sparse linear kernels\n\n{machine}\n\n{summary(rows)}"
        write_outputs(rows, args.out, "gpu" if cuda else "cpu", header)  # after each shape: partial runs count
        if cuda:
            torch.cuda.empty_cache()
    print(header)
    print(f"wrote {args.out}/bench_kernels_{'gpu' if cuda else 'cpu'}.csv and .md")


if __name__ == "__main__":
    main()
