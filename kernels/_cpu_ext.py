"""The C++ CPU kernels (kernels/cpu/): build once, load, and choose the instruction set.

`extension()` compiles kernels/cpu/{ext,isa_avx2,isa_avx512}.cpp with `torch.utils.cpp_extension.load` the
first time it is called in a fresh cache and loads the cached build afterwards (seconds). The cache lives in
$TORCH_EXTENSIONS_DIR when set, else ~/.cache/sparsedial/torch_extensions/<torch version>, one folder per
sha256 of the sources (`_staged_sources`). Each ISA unit
is one translation unit compiled for its instruction set (a `#pragma GCC target` at its top, equivalent to
`-mavx2 -mfma -mpopcnt` / `... -mavx512f -mavx512bw -mavx512vl -mavx512vpopcntdq` for that file alone); ext.cpp is baseline x86-64 and
calls the unit that `isa()` names:

* ``avx512`` when the CPU has AVX-512 F/BW/VL/VPOPCNTDQ (Ice Lake, Sapphire Rapids, Zen 4 and later), else
  ``avx2`` when it has AVX2 + FMA + POPCNT, else none;
* ``SPARSEDIAL_CPU_ISA=avx2`` (or ``avx512``) forces one (tests force the AVX2 path on AVX-512 machines; a
  forced ISA the CPU lacks is an error), ``SPARSEDIAL_CPU_ISA=none`` disables the kernels.

When the build fails (no compiler, no ninja, a non-x86 CPU) or no ISA fits, `extension()` returns None and
logs ONE line saying why; every launcher then runs its torch reference (same results, dense speed).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import threading
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger("sparsedial.kernels")

SOURCE_DIR = Path(__file__).resolve().parent / "cpu"
SOURCES = ("ext.cpp", "isa_avx2.cpp", "isa_avx512.cpp")
EXT_NAME = "sparsedial_cpu_kernels"
ISAS = ("avx512", "avx2")

_lock = threading.Lock()
_state: dict[str, object] = {}  # "ext": module | None, "why": str, "isa": str | None


def cache_dir() -> Path:
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return Path(env)
    version = torch.__version__.replace("+", "_")
    return Path.home() / ".cache" / "sparsedial" / "torch_extensions" / version


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's flags from /proc/cpuinfo (empty where there is none); read once (every launch asks)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def supported_isas(flags: frozenset[str] | set[str] | None = None) -> list[str]:
    """The ISA paths this CPU runs, widest first."""
    flags = cpu_flags() if flags is None else flags
    out = []
    if {"avx2", "fma", "popcnt"} <= flags:
        if {"avx512f", "avx512bw", "avx512vl", "avx512_vpopcntdq"} <= flags:
            out.append("avx512")
        out.append("avx2")
    return out


def _staged_sources() -> tuple[Path, list[Path]]:
    """The build folder for these exact sources, with a copy of them inside it: keyed by the sha256 of every
    file of kernels/cpu/, and compiled from the copy, so a source tree and a wheel installed elsewhere with
    the same sources share one build (ninja records absolute source paths: compiled from their own places,
    each copy would rebuild the other's every time), and a change of sources gets a folder of its own."""
    files = sorted(p for p in SOURCE_DIR.iterdir() if p.suffix in (".cpp", ".h"))
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    build_dir = cache_dir() / f"{EXT_NAME}-{digest.hexdigest()[:16]}"
    src = build_dir / "src"
    src.mkdir(parents=True, exist_ok=True)
    for f in files:
        dest = src / f.name
        if not dest.is_file() or dest.read_bytes() != f.read_bytes():
            tmp = dest.with_suffix(dest.suffix + f".{os.getpid()}.tmp")
            shutil.copyfile(f, tmp)
            os.replace(tmp, dest)  # atomic: a concurrent build never sees half a file
    return build_dir, [src / s for s in SOURCES]


def _build() -> ModuleType:
    import fcntl

    from torch.utils import cpp_extension

    build_dir, sources = _staged_sources()
    # torch's own build lock is a file that a killed build leaves behind, after which every later load
    # waits on it forever. Builds are serialized here with flock, which the kernel releases when its holder
    # dies: whoever holds it is the only sparsedial build of this folder, so a torch lock found then is stale.
    with open(build_dir / "sparsedial.flock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        stale = build_dir / "lock"
        if stale.exists():
            log.warning("removing a stale build lock left by an interrupted build: %s", stale)
            stale.unlink(missing_ok=True)
        return cpp_extension.load(name=EXT_NAME, sources=[str(s) for s in sources],
                                  extra_cflags=["-O3", "-fopenmp", "-DNDEBUG"], extra_ldflags=["-fopenmp"],
                                  build_directory=str(build_dir), verbose=False)


def _unavailable(why: str) -> None:
    _state.update(ext=None, why=why)
    log.warning("sparsedial CPU kernels unavailable (%s): packed tiers run their torch reference", why)


def extension() -> ModuleType | None:
    """The loaded extension (building it on first use), or None when it cannot run here (logged once)."""
    if "ext" in _state:
        return _state["ext"]  # type: ignore[return-value]
    with _lock:
        if "ext" in _state:
            return _state["ext"]  # type: ignore[return-value]
        forced = os.environ.get("SPARSEDIAL_CPU_ISA", "").strip().lower()
        if forced == "none":
            _unavailable("SPARSEDIAL_CPU_ISA=none")
            return None
        if platform.machine().lower() not in ("x86_64", "amd64"):
            _unavailable(f"CPU architecture {platform.machine()} has no kernels")
            return None
        if not supported_isas():
            _unavailable("the CPU lacks AVX2 + FMA")
            return None
        try:
            ext = _build()
        except Exception as exc:  # noqa: BLE001 - any build failure means the fallback
            first = str(exc).strip().splitlines()[:1]
            _unavailable(f"build failed: {type(exc).__name__}: {first[0] if first else ''}"[:300])
            return None
        _state.update(ext=ext, why="")
        return ext


def isa() -> str | None:
    """The ISA path the launchers use: SPARSEDIAL_CPU_ISA when set (checked), else the widest supported."""
    forced = os.environ.get("SPARSEDIAL_CPU_ISA", "").strip().lower()
    if forced in ("", "auto"):
        isas = supported_isas()
        return isas[0] if isas else None
    if forced == "none":
        return None
    if forced not in ISAS:
        raise ValueError(f"SPARSEDIAL_CPU_ISA must be avx2, avx512, none or auto, got {forced!r}")
    if forced not in supported_isas():
        raise ValueError(f"SPARSEDIAL_CPU_ISA={forced} but this CPU lacks it (has: {supported_isas() or 'none'})")
    return forced


def available() -> bool:
    """True when the kernels run here (the extension loads and an ISA path fits)."""
    return extension() is not None and isa() is not None


def launch(x: torch.Tensor, packed, bias: torch.Tensor | None, reference, call) -> torch.Tensor:
    """The shared body of the CPU launchers: y = x @ W.T (+ bias) for `packed` (shape (N, K)) by
    `call(ext, x2, bias32, isa)` on x as fp32 [M, K], or by `reference(x, packed, bias)` where the
    kernels cannot run (no extension, no ISA path, x not on the CPU). y has x's leading dims and dtype."""
    from ._launch import flatten_rows
    from .cpu_formats import _check_x

    _check_x(x, packed.shape, bias)
    ext, path = extension(), isa()
    if ext is None or path is None or x.device.type != "cpu":
        return reference(x, packed, bias)
    x2 = flatten_rows(x).float().contiguous()
    y = call(ext, x2, None if bias is None else bias.float().contiguous(), path)
    return y.reshape(*x.shape[:-1], packed.shape[0]).to(x.dtype)


def reset_for_tests() -> None:
    """Forget the loaded state (tests simulate a failed build, then restore)."""
    _state.clear()
