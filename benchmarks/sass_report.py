"""What do our Triton GPU kernels compile to? SASS of every kernel config, measured on a CPU (no GPU needed).

``triton.compile`` runs for a CUDA target (sm_90 / sm_80) without a device: it lowers to PTX, runs Triton's
bundled ``ptxas`` and returns the cubin; the ``nvdisasm`` and ``cuobjdump`` that ship with Triton
(``triton/backends/nvidia/bin``) disassemble it and report its resources. Per kernel, config and row
bucket (M = 1 and M = 8; decode kernels; M = 16 for the 2:4 tensor-core gemv, whose one BLOCK_M = 16 tile
serves 2..16 rows) this reports, from the SASS:

* the main loop: the largest innermost loop (a backward branch), its instructions per thread per step,
  and those times the threads of a program over the dense weights (or stored values) one step covers
  (loops with a runtime trip count that ptxas unrolled: divided by the unroll factor, the loop's FFMAs over
  the FFMAs of one iteration, shown as "unrolled xN");
* FMAs (FFMA / HFMA2 / tensor-core ops), global loads, barriers (BAR), and async copies (LDGSTS =
  ``cp.async``, UTMALDG / UBLKCP = TMA) inside that loop;
* registers and local memory (spills) per thread (``cuobjdump -res-usage``), the programs that fit on one
  SM at that register / shared-memory use, and for every shape of ``bench_kernels.py`` the programs per
  SM (grid size / 132 SMs of an H100 SXM) the launcher would start.

Usage: python benchmarks/sass_report.py [--arch 90 80] [--only 24,bitmap,cols,nested] [--write LABEL]
(``bench_kernels.py --sass`` runs it.) ``--write before|after`` stores the table in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for a real target, not the interpreter
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's current default, stated to silence its warning

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import DOCS, machine, write_section

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
SMS = 132  # H100 SXM
SHAPES = {  # as bench_kernels.SHAPES: name -> (N, K)
    "4096x4096": (4096, 4096),
    "11008x4096": (11008, 4096),
    "4096x11008": (4096, 11008),
    "14336x4096": (14336, 4096),
    "4096x14336": (4096, 14336),
    "1024x4096": (1024, 4096),
}
SM_LIMITS = {90: {"regs": 65536, "warps": 64, "blocks": 32, "smem": 227 * 1024},
             80: {"regs": 65536, "warps": 64, "blocks": 32, "smem": 163 * 1024}}
FMA_OPS = ("FFMA", "HFMA2", "HMMA", "HGMMA", "FMUL", "FADD")
ASYNC_OPS = ("LDGSTS", "UTMALDG", "UBLKCP", "UTMAPF")


@dataclass
class Job:
    """One compile: a kernel with its constexprs, and how to turn its loop into per-weight numbers."""

    kernel: str  # label in the table
    fn: object
    types: dict[str, str]  # non-constexpr argument types (ints default to i32)
    const: dict[str, object]
    num_warps: int
    num_stages: int
    m: int
    per_step: int  # dense weights (or stored values, for `unit`) one loop iteration covers
    unit: str  # "dense weight" or "stored value"
    grid: object  # (n, k, m) -> programs launched
    stored_frac: float | None = None  # stored values per dense weight (for the per-stored column)
    label: str = ""
    # FFMAs a thread issues per loop iteration, for loops with a runtime trip count that ptxas may unroll:
    # the loop's FFMAs over it is the unroll factor, and the counts are divided by it
    ffma_per_iter: int | None = None
    # (n, k, m) -> True where the kernel's autotuner prunes this config for that shape (shown "(pruned)")
    pruned: object = None
    result: dict = field(default_factory=dict)


def compile_job(job: Job, arch: int) -> dict:
    fn = job.fn
    sig, attrs = {}, {}
    for i, a in enumerate(fn.arg_names):
        if a in job.const:
            sig[a] = "constexpr"
            continue
        sig[a] = job.types.get(a, "i32")
        if sig[a].startswith("*") or a in ("N", "K", "stride_xm", "stride_ym"):
            attrs[(i,)] = [["tt.divisibility", 16]]  # what the JIT specializes for our aligned shapes
    src = ASTSource(fn, sig, job.const, attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": job.num_warps, "num_stages": job.num_stages})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run([str(BIN / "nvdisasm"), "-c", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
        res = subprocess.run([str(BIN / "cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True,
                             check=True).stdout
    regs = int(re.search(r"REG:(\d+)", res).group(1))
    local = int(re.search(r"LOCAL:(\d+)", res).group(1))
    smem = int(re.search(r"SHARED:(\d+)", res).group(1))
    loop = main_loop(sass)
    ptx_async = compiled.asm["ptx"].count("cp.async")
    return {"regs": regs, "local": local, "smem": smem, "ptx_cp_async": ptx_async, **loop}


def main_loop(sass: str) -> dict:
    """Largest innermost loop of a disassembly: its instruction counts by kind."""
    labels, instrs = {}, []  # label -> index of the next instruction; [(opcode, text)]
    for line in sass.splitlines():
        lab = re.match(r"\s*(\.L_x_\d+):", line)
        if lab:
            labels[lab.group(1)] = len(instrs)
            continue
        ins = re.search(r"/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line)
        if ins:
            text = re.sub(r"^@!?U?P\w+\s+", "", ins.group(1).strip())
            instrs.append((text.split()[0], text))
    loops = []
    for i, (op, text) in enumerate(instrs):
        tgt = re.search(r"`\((\.L_x_\d+)\)", text)
        if op.startswith("BRA") and tgt and labels.get(tgt.group(1), i + 1) < i:
            start = labels[tgt.group(1)]
            if i - start >= 4:  # the trailing `BRA self` after EXIT is not a loop
                loops.append((start, i))
    inner = [lp for lp in loops if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]
    if not inner:
        return {"loop": 0, "fma": 0, "ffma": 0, "ldg": 0, "bar": 0, "async": 0, "shfl": 0, "lds_sts": 0,
                "loops": 0}
    start, end = max(inner, key=lambda lp: lp[1] - lp[0])
    body = [op for op, _ in instrs[start:end + 1]]

    def count(*prefixes: str) -> int:
        return sum(1 for op in body if op.split(".")[0] in prefixes)

    return {"loop": len(body), "fma": count(*FMA_OPS), "ffma": count("FFMA"), "ldg": count("LDG"), "bar": count("BAR"),
            "async": count(*ASYNC_OPS), "shfl": count("SHFL"), "lds_sts": count("LDS", "STS"), "loops": len(loops)}


def resident(regs: int, smem: int, warps: int, arch: int) -> int:
    """Programs of one kernel that fit on one SM (register file, warp slots, shared memory)."""
    lim = SM_LIMITS[arch]
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = lim["regs"] // (regs_per_warp * warps)
    by_smem = lim["smem"] // smem if smem else lim["blocks"]
    return max(0, min(by_regs, lim["warps"] // warps, lim["blocks"], by_smem))


def jobs(only: set[str]) -> list[Job]:
    """Every autotune config of the decode kernels, at M = 1 and M = 8 (imports the current kernels)."""
    return legacy_jobs(only)


def gemv_grid(fn: object, bm: int, bn: int, bk: int):
    """Programs the launcher starts for (N, K, M): split-K kernels (a ws_ptr argument) split K as
    ``_triton_util.split_k_grid`` does; the older ones launch (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M))."""
    if "ws_ptr" in fn.arg_names:
        from sparsedial.kernels._triton_util import split_k_grid

        return lambda n, k, m: math.prod(split_k_grid(n, m, k, bm, bn, bk))
    return lambda n, k, m: -(-n // bn)


def autotune_pruned(module: object, tuned: str, m: int, bn: int, bk: int, w: int, st: int):
    """(n, k, m) -> whether the autotuner `module.tuned` drops the config (BN, BK, warps, stages) for that
    shape by its ``early_config_prune`` (None when it has none)."""
    at = getattr(module, tuned, None)
    prune = getattr(at, "early_config_prune", None)
    if prune is None:
        return None

    def pruned(n: int, k: int, rows: int) -> bool:
        kept = prune(at.configs, {"N": n, "K": k, "M": rows}, BLOCK_M=m)
        return not any(c.kwargs.get("BLOCK_N") == bn and c.kwargs.get("BLOCK_K") == bk and c.num_warps == w
                       and c.num_stages == st for c in kept)

    return pruned


def stages(fn: object, num_stages: int) -> dict[str, int]:
    """The NUM_STAGES constexpr (the K loop's ``tl.range(num_stages=...)``) of kernels that take it."""
    return {"NUM_STAGES": num_stages} if "NUM_STAGES" in fn.arg_names else {}


def legacy_jobs(only: set[str]) -> list[Job]:
    """Every autotune config of the gemv kernels of kernels/triton_24.py, triton_bitmap.py, triton_nested.py."""
    out = []
    h = {"x_ptr": "*fp16", "values_ptr": "*fp16", "bias_ptr": "*fp16", "y_ptr": "*fp16", "ws_ptr": "*fp32",
         "lock_ptr": "*i32"}
    for m in (1, 8):
        if "24" in only:
            from sparsedial.kernels import triton_24 as t

            fn, shapes, name = t._gemv_24_kernel, t.GEMV_SHAPES, "2:4 gemv"
            if hasattr(t, "_gemv_24_expand_kernel"):  # issue 14: gather x at M = 1, expand W at M = 2..8
                name = "2:4 gemv gather" if m == 1 else "2:4 gemv expand"
                if m > 1:
                    fn, shapes = t._gemv_24_expand_kernel, t.EXPAND_SHAPES
            for bn, bk, w, *rest in shapes:
                st = rest[0] if rest else 2
                out.append(Job(name, fn, {**h, "meta_ptr": "*i32"},
                               {"HAS_BIAS": False, "BLOCK_M": m, "BLOCK_N": bn, "BLOCK_K": bk, **stages(fn, st)}, w,
                               st, m, bn * bk, "dense weight", gemv_grid(fn, m, bn, bk), 0.5,
                               f"BN{bn} BK{bk} w{w} s{st}",
                               pruned=autotune_pruned(t, "_gemv_24_tuned", m, bn, bk, w, st) if m == 1 else None))
        if "bitmap" in only:
            from sparsedial.kernels import triton_bitmap as t

            fn, shapes, name = t._gemv_bitmap_kernel, t.GEMV_SHAPES, "bitmap gemv"
            if "GUARD" in fn.arg_names:  # issue 14: the running-pointer kernel for 1..8 rows
                name = "bitmap gemv count"
                shapes = t.GEMV_SHAPES if m == 1 else t.ROWS_SHAPES
            # the M = 1 kernel: unguarded value loads (pack_bitmap's values), and the guarded variant for
            # values without a readable tail (hand-built packs), first config only
            guards = [False, True] if "GUARD" in fn.arg_names else [None]
            for gi, guard in enumerate(guards):
                for bn, bk, w, *rest in shapes[:1] if gi else shapes:
                    st = rest[0] if rest else 2
                    flags = {"EVEN_K": True} if "EVEN_K" in fn.arg_names else {"HW_POPC": True}
                    if guard is not None:
                        flags["GUARD"] = guard
                    out.append(Job(name + (" guarded" if guard else ""), fn,
                                   {**h, "bitmap_ptr": "*i32", "offsets_ptr": "*i16", "row_ptr": "*i64"},
                                   {"HAS_BIAS": False, "BLOCK_M": m, "BLOCK_N": bn, "BLOCK_K": bk,
                                    **stages(fn, st), **flags},
                                   w, st, m, bn * bk, "dense weight", gemv_grid(fn, m, bn, bk), 0.5,
                                   f"BN{bn} BK{bk} w{w} s{st}"))
        if "nested" in only:
            out += nested_jobs(m)
    if "cols" in only:
        out += cols_jobs()
    if "24" in only:
        from sparsedial.kernels import triton_24 as t

        if hasattr(t, "_gemv_24_tc_kernel"):  # issue 14: tensor-core gemv, 2..16 rows in one BLOCK_M = 16 tile
            fn = t._gemv_24_tc_kernel
            for bn, bk, w, st in t.TC_SHAPES:
                out.append(Job("2:4 gemv tensor-core", fn, {**h, "meta_ptr": "*i32"},
                               {"HAS_BIAS": False, "IEEE_FP32": False, "BLOCK_M": t.TC_BLOCK_M, "BLOCK_N": bn,
                                "BLOCK_K": bk, "NUM_STAGES": st}, w, st, t.TC_BLOCK_M, bn * bk, "dense weight",
                               gemv_grid(fn, t.TC_BLOCK_M, bn, bk), 0.5, f"BN{bn} BK{bk} w{w} s{st}"))
    return out


def cols_jobs() -> list[Job]:
    """The values + one-byte column kernel (kernels/triton_cols.py) at M = 1 and 8: per stored value."""
    from sparsedial.kernels import triton_cols as t

    h = {"x_ptr": "*fp16", "values_ptr": "*fp16", "bias_ptr": "*fp16", "y_ptr": "*fp16", "ws_ptr": "*fp32",
         "lock_ptr": "*i32", "cols_ptr": "*u8", "run_ptr": "*i32"}
    fn, st = t._gemv_cols_kernel, t.COLS_STAGES
    return [Job("cols gemv", fn, h, {"HAS_BIAS": False, "HW_LOAD": True, "X_BITS": 16, "BLOCK_M": m,
                                     "BLOCK_N": bn, "BLOCK_V": bv, "NUM_STAGES": st},
                w, st, m, bn * bv, "stored value", gemv_grid(fn, m, bn, 256), None, f"BN{bn} BV{bv} w{w} s{st}",
                ffma_per_iter=max(1, m * bn * bv // (32 * w)))
            for m in (1, 8) for bn, bv, w in t.COLS_SHAPES]


def nested_jobs(m: int) -> list[Job]:
    from sparsedial.kernels import triton_nested as t

    h = {"x_ptr": "*fp16", "values_ptr": "*fp16", "bias_ptr": "*fp16", "y_ptr": "*fp16", "row_ptr": "*i64",
         "tile_off_ptr": "*i16", "ws_ptr": "*fp32", "lock_ptr": "*i32"}
    tile = 128
    out = []
    # ALIGN: the packs' run alignment (nested.DEFAULT_ALIGN, issue 14); kernels before it have no ALIGN
    from sparsedial.kernels import nested

    align = getattr(nested, "DEFAULT_ALIGN", 1)
    for bn, bj, w in t.COLS_SHAPES:
        fn = t._gemv_cols_kernel
        st = getattr(t, "COLS_STAGES", 2)
        extra = {"ALIGN": align} if "ALIGN" in fn.arg_names else {}
        out.append(Job("nested cols gemv", fn, {**h, "cols_ptr": "*u8", "ends_ptr": "*u8"},
                       {"HAS_BIAS": False, "TILE": tile, "BLOCK_M": m, "BLOCK_N": bn, "BLOCK_J": bj,
                        **({"HW_LOAD": True, "X_BITS": 16} if "HW_LOAD" in fn.arg_names else {}), **extra,
                        **stages(fn, st)}, w, st, m,
                       bn * bj, "stored value", gemv_grid(fn, m, bn, tile), None,
                       f"BN{bn} BJ{bj} w{w}" + (f" s{st} A{align}" if extra else ""),
                       ffma_per_iter=max(1, m * bn * bj // (32 * w))))
    stages_levels = getattr(t, "LEVELS_STAGES", 2)
    for bn, w in t.LEVELS_SHAPES:
        fn = t._gemv_levels_kernel
        out.append(Job("nested levels gemv", fn, {**h, "planes_ptr": "*i32"},
                       {"HAS_BIAS": False, "TILE": tile, "NUM_PLANES": 3, "BLOCK_M": m, "BLOCK_N": bn,
                        **({"ALIGN": align} if "ALIGN" in fn.arg_names else {}), **stages(fn, stages_levels)}, w, stages_levels, m, bn * tile, "dense weight",
                       gemv_grid(fn, m, bn, tile), None, f"BN{bn} w{w} s{stages_levels}"))
    return out


def table(rows: list[tuple[Job, int, dict]]) -> str:
    head = ("| kernel | config | M | arch | regs (spill B) | fit/SM | loop SASS/thread | per dense weight | "
            "per stored value | FMA | LDG | BAR | async | " + " | ".join(f"prog/SM {s}" for s in SHAPES) + " |")
    lines = [head, "|" + "---|" * (13 + len(SHAPES))]
    for job, arch, r in rows:
        if "error" in r:
            lines.append(f"| {job.kernel} | {job.label} | {job.m} | sm_{arch} | compile error: {r['error'][:80]} |")
            continue
        threads = 32 * job.num_warps
        unroll = max(1, r["ffma"] // job.ffma_per_iter) if job.ffma_per_iter else 1
        per = r["loop"] * threads / job.per_step / unroll
        if job.unit == "dense weight":
            dense, stored = per, (per / job.stored_frac if job.stored_frac else None)
        else:
            dense, stored = None, per
        progs = " | ".join(f"{job.grid(n, k, job.m) / SMS:.1f}"
                           + (" (pruned)" if job.pruned and job.pruned(n, k, job.m) else "")
                           for n, k in SHAPES.values()) if arch == 90 else " | ".join("" for _ in SHAPES)
        spill = f" ({r['local']})" if r["local"] else ""
        lines.append(
            f"| {job.kernel} | {job.label} | {job.m} | sm_{arch} | {r['regs']}{spill} | "
            f"{resident(r['regs'], r['smem'], job.num_warps, arch)} | {r['loop']}"
            f"{f' (unrolled x{unroll})' if unroll > 1 else ''} | "
            f"{'' if dense is None else f'{dense:.2f}'} | {'' if stored is None else f'{stored:.2f}'} | "
            f"{r['fma']} | {r['ldg']} | {r['bar']} | {r['async']} | {progs} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--only", default="24,bitmap,cols,nested", help="comma list of 24, bitmap, cols, nested")
    parser.add_argument("--write", default=None, help="store the table in docs/benchmarks.md under this label")
    args = parser.parse_args()
    rows = []
    for job in jobs(set(args.only.split(","))):
        for arch in args.arch:
            try:
                r = compile_job(job, arch)
            except Exception as exc:  # noqa: BLE001 -- a config that does not compile is a row, not a crash
                r = {"error": f"{type(exc).__name__}: {exc}".replace("\n", " ")}
            rows.append((job, arch, r))
            print(table([(job, arch, r)]).splitlines()[-1], file=sys.stderr, flush=True)
    tools = (f"triton {triton.__version__} (`triton.compile`, target cuda sm_{'/sm_'.join(map(str, args.arch))}), "
             f"{ptxas_version()}, nvdisasm / cuobjdump from `triton/backends/nvidia/bin`; compiled on "
             f"{machine()} (compile only: no kernel ran, no GPU timing)")
    body = table(rows)
    print(f"\n{tools}\n\n{body}")
    if args.write:
        write_section(DOCS / "benchmarks.md", f"sass-{args.write}", f"{tools}\n\n{body}", "Benchmarks")
        print(f"wrote the sass-{args.write} block of {DOCS / 'benchmarks.md'}")


def ptxas_version() -> str:
    out = subprocess.run([str(BIN / "ptxas"), "--version"], capture_output=True, text=True, check=False).stdout
    rel = re.search(r"release ([\d.]+)", out)
    return f"ptxas {rel.group(1)}" if rel else "ptxas"


if __name__ == "__main__":
    main()
