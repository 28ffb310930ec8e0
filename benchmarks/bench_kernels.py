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

Nested-tier format (``--formats nested`` or ``all``; ``kernels/nested.py``): bytes per weight that each of
the 7 tiers (90..30%) reads from one shared ``PackedNested`` against a per-tier ``PackedBitmap`` and dense
fp16, the bytes stored for all tiers, and per tier on a GPU the Triton nested kernel (both indexes) vs
dense ``F.linear`` and the per-tier bitmap kernel; on a CPU the torch references. Writes
<out>/bench_kernels_nested_<gpu|cpu>.csv and .md and the ``nested`` section of docs/benchmarks.md.

Writes <out>/bench_kernels_<gpu|cpu>.csv and .md.  Usage:
    python benchmarks/bench_kernels.py [--quick] [--paths] [--out docs] [--formats classic|nested|all]
    python benchmarks/bench_kernels.py --sass [sass_report.py options]   (SASS of every config, no GPU needed)
"""

from __future__ import annotations

import argparse
import csv
import math
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from sparsedial.kernels import pack_24, pack_bitmap, pack_nested, sparse_linear
from sparsedial.kernels.formats import pack_cols

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import DOCS, write_section
from _report import machine as machine_line

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
COLS_MIN_SPARSITY = 0.7  # the values + one-byte column format (kernels/triton_cols.py) is timed from here on
NESTED_SPARSITIES = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)  # the model's unstructured tiers, sparsest first
NESTED_BYTES_SHAPE = "llama2-7b qkvo 4096x4096"  # the shape of the bytes table (bytes/weight barely move with K)


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
    cols: dict[float, object]  # same masks as `bitmaps`, sparsities >= COLS_MIN_SPARSITY


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
        bitmaps, cols = {}, {}
        for s in BITMAP_SPARSITIES:
            mask = torch.rand(n, k, device=dev) >= s
            bitmaps[s] = pack_bitmap(w, mask)
            if s >= COLS_MIN_SPARSITY:
                cols[s] = pack_cols(w, mask)
            if i == 0:
                refs[s] = torch.where(mask, w, torch.zeros_like(w))
        if i == 0:
            refs["24"] = w24
        sets.append(WeightSet(w, pack_24(w, mask24), torch_24, bitmaps, cols))
    return sets, refs, note


def timed_row(base: dict, fns: list[Callable[[], torch.Tensor]], ref: Callable[[], torch.Tensor] | None,
              nbytes: int, peak: float | None, cuda: bool, rep_ms: int, note: str) -> Row:
    """One measured row: error of fns[0] against `ref`, then time (CUDA graphs over the rotated weight sets on
    a GPU, the first set eagerly on a CPU) and achieved GB/s for `nbytes` moved per call. A failing method is
    reported in its row, not fatal."""
    try:
        err = rel_err(fns[0](), ref()) if ref is not None else None
        us, mode = time_gpu(fns) if cuda else (time_cpu(fns[0], rep_ms), "eager")
    except Exception as exc:  # noqa: BLE001
        return Row(**base, us=None, gbps=None, frac_peak_bw=None, speedup_vs_dense=None, max_rel_err=None,
                   note=f"n/a: {type(exc).__name__}: {exc}"[:120])
    gbps = nbytes / (us * 1e-6) / 1e9
    return Row(**base, us=us, gbps=gbps, frac_peak_bw=gbps / peak if peak else None, speedup_vs_dense=None,
               max_rel_err=err, note=(note + " " + mode).strip())


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
            ref = None if ref_w is None else (lambda: F.linear(xs[0], ref_w))  # noqa: B023
            rows.append(timed_row(base, fns, ref, wbytes + io_bytes, peak, cuda, rep_ms, note))  # noqa: B023

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
            if s in sets[0].cols:
                add(f"ours cols {int(100 * s)}%", lambda ws, x, s=s: lambda: sparse_linear(x, ws.cols[s]),
                    sets[0].cols[s].nbytes, refs[s], gpu_only=True)
        this_m = [r for r in rows if r.m == m]
        dense_us = this_m[0].us  # "dense F.linear" is added first
        for r in this_m:
            if r.us and dense_us:
                r.speedup_vs_dense = dense_us / r.us
        print(f"  {name} M={m}: " + ", ".join(f"{r.method}={fmt(r.us, '.1f')}" for r in this_m), flush=True)
    return rows


# --------------------------------------------------------------------------------------------------
# Nested-tier format: one shared copy of the values for all 7 unstructured tiers
# --------------------------------------------------------------------------------------------------


def pct(s: float) -> str:
    return f"{round(100 * s)}%"


def nested_masks(n: int, k: int, dev: str) -> list[torch.Tensor]:
    """Nested masks as the engine builds them: a random per-row rank keeps int(K (1 - s)) weights per tier."""
    rank = torch.rand(n, k, device=dev).argsort(dim=1).argsort(dim=1)
    return [rank < max(1, int(k * (1 - s))) for s in NESTED_SPARSITIES]


def nested_bytes_tables(n: int, k: int) -> tuple[str, str]:
    """Markdown: bytes/weight each tier's matmul reads (fp16), and bytes/weight stored for all tiers."""
    w = torch.randn(n, k).to(torch.float16)  # CPU: only the byte counts are used
    masks = nested_masks(n, k, "cpu")
    packs = {index: pack_nested(w, masks, index=index) for index in ("both", "cols", "levels")}
    bitmaps = [pack_bitmap(w, mask) for mask in masks]
    p, size = packs["both"], n * k
    read = [("| tier | density | nested read (index used) | nested cols | nested levels | per-tier bitmap | "
             "dense fp16 | byte ceiling nested | byte ceiling bitmap |"), "|" + "---|" * 9]
    for tier, s in enumerate(NESTED_SPARSITIES):
        nested, bitmap = p.bytes_per_weight(tier), bitmaps[tier].nbytes / size
        read.append(f"| {pct(s)} | {p.density(tier):.3f} | {nested:.3f} ({p.index_for(tier)}) | "
                    f"{p.bytes_per_weight(tier, 'cols'):.3f} | {p.bytes_per_weight(tier, 'levels'):.3f} | "
                    f"{bitmap:.3f} | 2.000 | {2 / nested:.2f}x | {2 / bitmap:.2f}x |")
    stored = ["| all 7 tiers resident as | stored bytes/weight |", "|---|---|"]
    stored += [f"| one nested pack, {label} | {packs[index].stored_bytes_per_weight:.3f} |"
               for index, label in (("both", "both indexes"), ("cols", "cols index only"),
                                    ("levels", "levels index only"))]
    stored.append(f"| 7 per-tier bitmaps | {sum(b.nbytes for b in bitmaps) / size:.3f} |")
    stored.append(f"| 7 dense fp16 copies | {7 * 2:.3f} |")
    return "\n".join(read), "\n".join(stored)


def bench_nested_shape(name: str, n: int, k: int, ms: list[int], cuda: bool, peak: float | None,
                       rep_ms: int) -> list[Row]:
    """Per tier: Triton nested (cols and levels index) and per-tier bitmap on a GPU, references on a CPU."""
    dev = "cuda" if cuda else "cpu"
    dtype = torch.float16 if cuda else torch.float32
    dense_bytes = n * k * (torch.finfo(dtype).bits // 8)
    # Rotate enough weight sets that the smallest read (nested 90%, ~0.16 of dense) spans > 2x L2.
    count = min(12, max(2, math.ceil(120e6 / (0.16 * dense_bytes)))) if cuda else 1
    sets = []
    for i in range(count):
        w = (torch.randn(n, k, device=dev) / math.sqrt(k)).to(dtype)
        masks = nested_masks(n, k, dev)
        sets.append((w, pack_nested(w, masks), [pack_bitmap(w, mask) for mask in masks]))
        if i == 0:
            refs = [torch.where(mask, w, torch.zeros_like(w)) for mask in masks]
    nested0, bitmaps0 = sets[0][1], sets[0][2]
    rows: list[Row] = []
    for m in ms:
        xs = [torch.randn(m, k, device=dev).to(dtype) for _ in sets]
        io_bytes = (m * k + m * n) * (torch.finfo(dtype).bits // 8)

        def measure(method: str, make: Callable, wbytes: int, ref_w: torch.Tensor, note: str = "") -> None:
            base = {"device": dev, "shape": name, "n": n, "k": k, "m": m,  # noqa: B023
                    "method": method, "byte_ceiling": dense_bytes / wbytes}
            fns = [make(ws, x) for ws, x in zip(sets, xs, strict=True)]  # noqa: B023
            ref = lambda: F.linear(xs[0], ref_w)  # noqa: B023
            rows.append(timed_row(base, fns, ref, wbytes + io_bytes, peak, cuda, rep_ms, note))  # noqa: B023

        measure("dense F.linear", lambda ws, x: lambda: F.linear(x, ws[0]), dense_bytes, sets[0][0])
        for tier, s in enumerate(NESTED_SPARSITIES):
            if cuda:
                from sparsedial.kernels.triton_nested import linear_nested_triton

                for index in ("cols", "levels"):
                    measure(f"nested [{index}] {pct(s)}",
                            lambda ws, x, t=tier, i=index: lambda: linear_nested_triton(x, ws[1], t, index=i),
                            nested0.read_bytes(tier, index), refs[tier],
                            "auto" if index == nested0.index_for(tier) else "")
                measure(f"bitmap {pct(s)}", lambda ws, x, t=tier: lambda: sparse_linear(x, ws[2][t]),
                        bitmaps0[tier].nbytes, refs[tier])
            else:
                measure(f"nested reference {pct(s)}",
                        lambda ws, x, t=tier: lambda: sparse_linear(x, ws[1], tier=t, backend="torch"),
                        nested0.read_bytes(tier), refs[tier])
                measure(f"bitmap reference {pct(s)}",
                        lambda ws, x, t=tier: lambda: sparse_linear(x, ws[2][t], backend="torch"),
                        bitmaps0[tier].nbytes, refs[tier])
        this_m = [r for r in rows if r.m == m]
        for r in this_m:
            if r.us and this_m[0].us:
                r.speedup_vs_dense = this_m[0].us / r.us
        print(f"  nested {name} M={m}: " + ", ".join(f"{r.method}={fmt(r.us, '.1f')}" for r in this_m), flush=True)
    return rows


def nested_pivot(rows: list[Row]) -> str:
    """Markdown: one line per (shape, M, method), one column per tier: us (speedup vs dense), * = auto index."""
    head = "| shape (N x K) | M | dense us | method | " + " | ".join(pct(s) for s in NESTED_SPARSITIES) + " |"
    lines = [head, "|" + "---|" * (4 + len(NESTED_SPARSITIES))]
    for (shape, m) in dict.fromkeys((r.shape, r.m) for r in rows):
        group = [r for r in rows if r.shape == shape and r.m == m]
        dense, by_method = group[0], {}
        for r in group[1:]:
            label, tier = r.method.rsplit(" ", 1)
            by_method.setdefault(label, {})[tier] = r
        for label, cells in by_method.items():
            vals = [cells.get(pct(s)) for s in NESTED_SPARSITIES]
            text = [f"{fmt(c.us, '.1f')} ({fmt(c.speedup_vs_dense, '.2f')}x){' *' if 'auto' in c.note else ''}"
                    if c and c.us else "n/a" for c in vals]
            lines.append(f"| {shape} | {m} | {fmt(dense.us, '.1f')} | {label} | " + " | ".join(text) + " |")
    return "\n".join(lines)


def nested_section(machine: str, cuda: bool, bytes_md: str, stored_md: str, timing_md: str, max_err: float) -> str:
    """The `nested` section of docs/benchmarks.md: every number in it comes from this run."""
    speed = ("Per-tier GPU timings below, us (speedup vs dense): the Triton nested kernel with each index "
             "(* = the one `index_for` picks) and the per-tier bitmap kernel, fp16, CUDA graphs as in \"Kernels\"."
             if cuda else
             "**GPU speed was NOT measured** (no GPU in this run): the Triton nested kernel was checked for "
             "correctness only (TRITON_INTERPRET=1, tests/kernels/test_nested.py). The timings below, us (speedup "
             "vs dense fp32 `F.linear`), are the CPU torch references (unpack + `F.linear`), not kernel speed.")
    command = " ".join(["python benchmarks/bench_kernels.py", *sys.argv[1:]])
    return f"""## Nested-tier format

Measured by `{command}` on {machine}.

**Format** (`kernels/nested.py`, `PackedNested`): the 7 nested unstructured tiers (90..30%, sparsest first)
share one copy of the values of the densest tier. Per row and 128-input column tile the values run by the
tier that first keeps them (level), then by column, so tier k reads a prefix of every tile; each run is
padded to a multiple of 4 entries (`align`, so the cols kernel's loads are aligned 8-byte / 4-byte cp.async
copies). Two indexes locate a value: `cols` (uint8 in-tile column per value + per-tier prefix lengths; reads
3 bytes per kept weight, each tile's prefix rounded up to 4 entries) and `levels` (a 3-bit level code per weight as bit planes; reads 2 bytes per kept weight + 3/8 per
weight, ranks computed in registers). `pack_nested(..., index="both")` stores both and each tier reads the
cheaper (`index_for`). One shared copy of values means the tiers' weights are W restricted to each mask:
no per-tier merged LoRA (unmasked LoRA runs beside the sparse base). Not wired into the engine.

Bytes per weight a tier's decode matmul reads ({NESTED_BYTES_SHAPE}, fp16 values, random per-row ranks as
the engine's drop levels give; byte ceiling = 2 / bytes, the decode speedup bound vs dense fp16):

{bytes_md}

Stored for all tiers together:

{stored_md}

{speed} Largest relative error against `F.linear` on the masked dense weight: {max_err:.1e}. Every
row also went to `bench_kernels_nested_{'gpu' if cuda else 'cpu'}.csv` / `.md` in the run's `--out` folder.

{timing_md}
"""


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
    if "--sass" in sys.argv:  # compile-only report (benchmarks/sass_report.py): runs on a CPU
        import runpy

        sys.argv = [str(Path(__file__).with_name("sass_report.py"))] + [a for a in sys.argv[1:] if a != "--sass"]
        runpy.run_path(sys.argv[0], run_name="__main__")
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two shapes, M in {1, 8, 32}")
    parser.add_argument("--paths", action="store_true", help="also time the gemv and dot kernels separately")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the CSV and markdown (default: docs/, or a temporary folder with "
                             "--quick or --no-write, so a check never replaces the documented run)")
    parser.add_argument("--rep-ms", type=int, default=40, help="timing budget per measurement (ms)")
    parser.add_argument("--formats", choices=("classic", "nested", "all"), default="classic",
                        help="classic: 2:4 and bitmap; nested: the nested-tier format; all: both")
    parser.add_argument("--no-write", dest="write", action="store_false",
                        help="leave docs/benchmarks.md alone (the nested section)")
    args = parser.parse_args()
    if args.out is None:
        args.out = Path("docs") if args.write and not args.quick else Path(tempfile.mkdtemp(prefix="bench_kernels_"))

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
    for name, (n, k) in shapes.items() if args.formats != "nested" else ():
        rows += bench_shape(name, n, k, ms, cuda, peak, args.rep_ms, args.paths)
        header = f"# Sparse linear kernels\n\n{machine}\n\n{summary(rows)}"
        write_outputs(rows, args.out, "gpu" if cuda else "cpu", header)  # after each shape: partial runs count
        if cuda:
            torch.cuda.empty_cache()
    if rows:
        print(header)
        print(f"wrote {args.out}/bench_kernels_{'gpu' if cuda else 'cpu'}.csv and .md")
    if args.formats != "classic":
        run_nested(args, shapes, ms, cuda, peak, machine)


def run_nested(args: argparse.Namespace, shapes: dict, ms: list[int], cuda: bool, peak: float | None,
               machine: str) -> None:
    """Bytes tables, per-tier timings, outputs and the docs section of the nested-tier format."""
    if not cuda:  # two-thread OpenMP teams on the 2-core CI VM swung 8-150 ms per reference call; one is stable
        torch.set_num_threads(1)
    bytes_md, stored_md = nested_bytes_tables(*SHAPES[NESTED_BYTES_SHAPE])
    print(bytes_md + "\n\n" + stored_md, flush=True)
    rows: list[Row] = []
    for name, (n, k) in shapes.items():
        rows += bench_nested_shape(name, n, k, ms, cuda, peak, args.rep_ms)
        tag = f"nested_{'gpu' if cuda else 'cpu'}"
        write_outputs(rows, args.out, tag, f"# Nested-tier format\n\n{machine}\n\n{nested_pivot(rows)}")
        if cuda:
            torch.cuda.empty_cache()
    errs = [r.max_rel_err for r in rows if r.max_rel_err is not None]
    where = machine if cuda else f"{machine_line()}; no GPU"
    body = nested_section(where, cuda, bytes_md, stored_md, nested_pivot(rows), max(errs, default=0.0))
    print(body)
    if args.write:
        write_section(DOCS / "benchmarks.md", "nested", body, "Benchmarks")
        print(f"wrote the nested section of {DOCS / 'benchmarks.md'}")


if __name__ == "__main__":
    main()
