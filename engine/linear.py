"""The one linear class every projection of the decoder goes through.

`ElasticLinear` is a plain `y = x @ W.T + b` until an `ElasticModel` attaches its elastic state: the
linear's maps (drop levels, 2:4 mask, LoRA stack, see engine/elastic_format.py) and a small table of
materialized tiers for the active backend. Which tier each row runs at comes with the call: the runner
passes a `TierPlan` (engine/tiers.py) to `Transformer.forward`, which hands it to every projection; without
a plan a linear computes with its base weight (dense). Switching tier changes a key, never modules.
Parameter names match `nn.Linear` (`weight`, `bias`), so HF state dicts load into it unchanged.

Backends of a materialized tier (`TierWeights`):
- `torch`: the tier's merged weight `(W + delta) * M` (masked LoRA mode), or the sparse base `W * M` plus a
  low-rank path `x A^T B^T` (unmasked mode), run with `F.linear`. A dense tier without LoRA shares `W`.
- `triton`: the same weights packed (`pack_24` for the 2:4 tier, `pack_bitmap` otherwise) and run with
  `sparsedial.kernels.sparse_linear` (Triton on CUDA; its torch reference elsewhere).
- `torch` on a CPU in fp32 with the CPU kernels on (`EngineConfig.cpu_kernels`, True by default; the
  `cpu_kernels` argument of `ElasticModel.load`, False there, keeps the fp32 path above): each tier is stored
  only in the packed bf16 format its C++ kernel reads (kernels/cpu_*.py; section "CPU packed tiers" below):
  2:4 and tiers >= BITMASK_MIN_SPARSITY as `PackedBitmask`, high sparsities also (or only) as `PackedCols`
  for more rows (`sparse_formats`, per ISA path), lower sparsities as a masked bf16 `PackedDense`; the dense tier adds a bf16 copy used up to `dense_bf16_max_rows()` rows (fp32
  MKL above, where it wins). No fp32 copy per sparse tier: a tier's bytes are its packed bytes.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .elastic_format import ElasticSpec, active_lora_groups, merged_weight, tier_mask
from .options import Backend
from .tiers import TierKind, TierPlan, TierSpec

log = logging.getLogger("sparsedial.engine")


@dataclass
class TierWeights:
    """One materialized tier of one linear: `weight` and/or `packed` / `cpu` (a CPU dense tier holds both)."""

    weight: torch.Tensor | None = None  # [out, in], F.linear
    packed: object | None = None  # kernels.Packed24 | kernels.PackedBitmap
    csr: torch.Tensor | None = None  # CSR copy of `weight` (CPU, >= 80% sparse), used for >= csr_min_rows rows
    csr_min_rows: int = 0
    cpu: object | None = None  # kernels.PackedDense | PackedBitmask | PackedCols: the CPU kernel's weight
    cpu_max_rows: int | None = None  # use `cpu` up to this many rows (None: always), `cpu_wide`/`weight` above
    cpu_wide: object | None = None  # the CPU format above cpu_max_rows rows (a sparse tier's second format)
    lora_a: torch.Tensor | None = None  # [r, in]   unmasked LoRA mode only
    lora_b: torch.Tensor | None = None  # [out, r]  scale folded in
    nbytes: int = 0  # bytes owned by this tier (0 when it shares the base weight)

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # x: [..., in] -> [..., out]
        small = self.cpu_max_rows is None or x.numel() <= self.cpu_max_rows * x.shape[-1]
        if self.cpu is not None and (small or self.cpu_wide is not None):
            from sparsedial.kernels.cpu_dispatch import cpu_linear

            y = cpu_linear(x, self.cpu if small else self.cpu_wide, bias)
        elif self.packed is not None:
            from sparsedial.kernels import sparse_linear

            y = sparse_linear(x, self.packed, bias)
        elif self.csr is not None and x.numel() >= self.csr_min_rows * x.shape[-1]:
            y = torch.sparse.mm(self.csr, x.reshape(-1, x.shape[-1]).T).T  # [rows, out]
            y = y.reshape(*x.shape[:-1], y.shape[-1])
            if bias is not None:
                y = y + bias
        else:
            y = F.linear(x, self.weight, bias)
        if self.lora_a is not None:
            y = y + F.linear(F.linear(x, self.lora_a), self.lora_b)  # low-rank path beside the sparse base
        return y


@dataclass
class LinearMaps:
    """The elastic tensors of one linear, keyed as in elastic.safetensors (`<name>.drop_level` ...)."""

    name: str  # e.g. model.layers.0.mlp.up_proj
    layer: int  # decoder block index
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def _csr_min_rows(sparsity: float) -> int | None:
    """Rows from which CSR beats the dense masked matmul (served column-major) on a CPU (docs/benchmarks.md,
    "CPU: weight layout, and CSR vs dense"): at 90% from 8 rows (1.03-1.14x, 1.5-1.9x at 32-64), at 80%
    from 64 (1.06-1.20x); below 80% never."""
    if sparsity >= 0.9 - 1e-9:
        return 8
    if sparsity >= 0.8 - 1e-9:
        return 64
    return None


def _attach_csr(tw: TierWeights, tier: TierSpec) -> None:
    """CPU fp32 tiers of >= 80% sparsity also get a CSR copy of their merged weight (10-20% of the bytes)."""
    w = tw.weight
    min_rows = _csr_min_rows(tier.sparsity) if tier.kind is TierKind.UNSTRUCTURED and tier.schedule is None else None
    if min_rows is None or w is None or w.device.type != "cpu" or w.dtype != torch.float32:
        return
    with warnings.catch_warnings():  # torch calls sparse CSR "beta"; the path is tested here
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        tw.csr, tw.csr_min_rows = w.to_sparse_csr(), min_rows
    tw.nbytes += sum(_nbytes(t) for t in (tw.csr.crow_indices(), tw.csr.col_indices(), tw.csr.values()))


# ------------------------------------------------------------------------------- CPU packed tiers
# (issue 12) Chosen from benchmarks/bench_cpu_kernels.py (docs/benchmarks.md, "CPU decode"): on the machines
# measured the bf16 dense kernel beats fp32 MKL from 1 to 32 rows and MKL wins at prefill sizes. Sparse
# tiers: the bitmask kernel (bytes ~ kept weights, dense FMAs) from BITMASK_MIN_SPARSITY and for 2:4 (the
# same bytes as a 2:4 format, faster than a 2:4 kernel of its own); the tiled format (work ~ kept weights)
# wins at high sparsity once several rows share the weights, and on AVX2 (8-lane expansion) sooner, so
# tiers at or above `tiled_from` also hold it and use it above `bitmask_rows` rows (0: tiled only); lower
# sparsities stay a masked bf16 dense weight (at 30% the bitmask saves little at one row, loses at eight).
DENSE_BF16_MAX_ROWS = 32
BITMASK_MIN_SPARSITY = 0.45
# ISA path -> ((tiled_from sparsity, bitmask_rows), ...) checked in order; past every entry: bitmask only
SPARSE_FORMATS: dict[str, tuple[tuple[float, int], ...]] = {
    "avx512": ((0.8, 4),),  # 90%, 8 rows: tiled 2.46x vs bitmask 1.34x of bf16 dense; 1-4 rows: bitmask
    # 90%: tiled from 1 row (2.5x vs 1.9x); 80%: tiled from 3 rows (4 rows: 1.6x vs 1.1x); 70% keeps one
    # format (both would hold 0.43x of a dense fp32 copy; the bitmask is 1.75x at 1 row, 1.0x at 8)
    "avx2": ((0.9, 0), (0.8, 2)),
}


def sparse_formats(sparsity: float, isa: str | None) -> tuple[bool, int | None]:
    """(holds the tiled format, rows up to which the bitmask serves: None = always) for an unstructured tier."""
    for tiled_from, rows in SPARSE_FORMATS.get(isa or "", ()):
        if sparsity >= tiled_from - 1e-9:
            return True, rows
    return False, None


def _cpu_kernels_serve(w: torch.Tensor, backend: Backend) -> bool:
    """True when the packed CPU kernels can serve weight `w`: torch backend, fp32 CPU weights, and the kernels
    run here (where they cannot build, kernels._cpu_ext logs one line and the fp32 path serves)."""
    if not (backend == Backend.TORCH and w.device.type == "cpu" and w.dtype == torch.float32):
        return False
    from sparsedial.kernels import _cpu_ext

    return _cpu_ext.available()


_rows_lock = threading.Lock()


@functools.cache
def _measured_dense_bf16_max_rows() -> int | None:
    env = os.environ.get("SPARSEDIAL_CPU_DENSE_BF16_ROWS", "").strip().lower()
    if env:
        if env == "all":
            return None
        if not env.isdigit():
            raise ValueError(f"SPARSEDIAL_CPU_DENSE_BF16_ROWS must be 'all' or a row count, got {env!r}")
        return int(env)
    import time

    from sparsedial.kernels.cpu_dispatch import cpu_linear
    from sparsedial.kernels.cpu_formats import pack_dense_bf16

    g = torch.Generator().manual_seed(0)
    w = torch.randn(2048, 2048, generator=g)
    x, ws, packed = torch.randn(128, 2048, generator=g), serving_layout(w), pack_dense_bf16(w)
    best = {"mkl": float("inf"), "bf16": float("inf")}
    with torch.inference_mode():
        for _ in range(3):
            for kind, run in (("mkl", lambda: F.linear(x, ws)), ("bf16", lambda: cpu_linear(x, packed))):
                t = time.perf_counter()
                run()
                best[kind] = min(best[kind], time.perf_counter() - t)
    rows = None if best["bf16"] < best["mkl"] else DENSE_BF16_MAX_ROWS
    log.info("dense CPU tiers: the bf16 kernel %s (128 rows: bf16 %.1f ms, fp32 MKL %.1f ms; "
             "SPARSEDIAL_CPU_DENSE_BF16_ROWS=all|N fixes it)",
             "at every row count" if rows is None else f"up to {rows} rows, fp32 MKL above",
             best["bf16"] * 1e3, best["mkl"] * 1e3)
    return rows


def dense_bf16_max_rows() -> int | None:
    """Rows up to which a dense tier runs the bf16 kernel; None: every row count (fp32 MKL never).

    Up to DENSE_BF16_MAX_ROWS (decode) always: faster than MKL on every machine measured. Above, it depends
    on MKL's code path for the CPU: measured once per process (a 2048 x 2048 weight at 128 rows, best of 3
    each way, ~30 ms) on the layout the fp32 path serves. On the AMD EPYC of docs/benchmarks.md MKL ran at
    0.49x / 0.57x of the bf16 kernel's speed at 32 / 128 rows (benchmarks/bench_cpu_kernels.py --fp32);
    the Intel Xeon of earlier runs favoured MKL at prefill sizes. The measurement is logged; the environment
    variable SPARSEDIAL_CPU_DENSE_BF16_ROWS=all (or a row count) replaces it, for runs that must not depend
    on the machine's load (above the limit the math differs: fp32 weights instead of bf16)."""
    with _rows_lock:  # one measurement per process, even when tiers are built from two threads
        return _measured_dense_bf16_max_rows()


def _dense_cpu_tier(w: torch.Tensor) -> TierWeights:
    """A dense weight on the CPU kernel path: a bf16 copy that the dense bf16 kernel reads at decode (and for
    prefill where it beats MKL here: `dense_bf16_max_rows`), `w` itself for fp32 MKL above."""
    from sparsedial.kernels.cpu_formats import pack_dense_bf16

    packed = pack_dense_bf16(w.contiguous())
    return TierWeights(weight=w, cpu=packed, cpu_max_rows=dense_bf16_max_rows(), nbytes=packed.nbytes)


def _cpu_pack(w: torch.Tensor, mask: torch.Tensor | None, tier: TierSpec) -> TierWeights:
    """A tier's weights on the CPU kernel path from its merged weight `w` [out, in], keeping the positions
    `mask` keeps (None: every one); `w` itself need not be masked."""
    from sparsedial.kernels import _cpu_ext
    from sparsedial.kernels.cpu_formats import pack_bitmask, pack_cols_bf16, pack_dense_bf16

    w = w.contiguous()
    tiled, bitmask_rows = sparse_formats(tier.sparsity, _cpu_ext.isa())
    if mask is None:
        tw = TierWeights(cpu=pack_dense_bf16(w))
    elif tier.kind is not TierKind.NM and tiled and bitmask_rows == 0:
        tw = TierWeights(cpu=pack_cols_bf16(w, mask))
    elif tier.kind is not TierKind.NM and tiled:
        tw = TierWeights(cpu=pack_bitmask(w, mask), cpu_max_rows=bitmask_rows, cpu_wide=pack_cols_bf16(w, mask))
    elif tier.kind is TierKind.NM or tier.sparsity >= BITMASK_MIN_SPARSITY - 1e-9:
        tw = TierWeights(cpu=pack_bitmask(w, mask))
    else:
        tw = TierWeights(cpu=pack_dense_bf16(w * mask))  # zeros stored
    tw.nbytes = sum(p.nbytes for p in (tw.cpu, tw.cpu_wide) if p is not None)  # type: ignore[attr-defined]
    return tw


class PackedHead(nn.Module):
    """The LM head on the CPU kernel path: the same fp32 `weight` (tied to the embedding when the model
    ties them; parameter names as `nn.Linear`'s) served as a dense CPU tier (`_dense_cpu_tier`: a bf16 copy
    for decode, fp32 MKL above). At decode the head is one of the largest matrices a step streams (the
    vocabulary x hidden), so halving its bytes matters at every tier."""

    def __init__(self, head: nn.Linear) -> None:
        super().__init__()
        self.weight = head.weight
        self.bias = head.bias
        self.in_features, self.out_features = head.in_features, head.out_features
        self.tier = _dense_cpu_tier(head.weight)

    @property
    def nbytes(self) -> int:
        return self.tier.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tier.apply(x, self.bias)


def packed_head(head: nn.Module, backend: Backend) -> PackedHead | None:
    """A PackedHead for `head` when the CPU kernels can serve it (an nn.Linear), else None."""
    ok = isinstance(head, nn.Linear) and _cpu_kernels_serve(head.weight, backend)
    return PackedHead(head) if ok else None


def serving_layout(w: torch.Tensor) -> torch.Tensor:
    """`w` [out, in] as served: on a CPU in fp32, the same values stored column-major (a transposed view of a
    contiguous [in, out] tensor, no extra memory); elsewhere unchanged. MKL's sgemm computes `x @ W.T`
    from that layout faster at the 4-32 rows of a decode step (projections 1.25-1.7x, the LM head 1.8-2.2x
    at 4-8 rows), about even at 1-2 and 64-512 rows except the LM head, 0.7-0.8x at 64-128 rows (it sees
    one row per sequence when serving). docs/benchmarks.md, "CPU: weight layout"; bf16 keeps row-major
    (no gain there), CUDA too."""
    if w.device.type == "cpu" and w.dtype == torch.float32 and w.dim() == 2 and w.is_contiguous():
        return w.t().contiguous().t()
    return w


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class ElasticLinear(nn.Module):
    """A linear projection `[..., in_features] -> [..., out_features]` with runtime tiers."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))  # [out, in]
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.maps: LinearMaps | None = None  # None: a plain linear (every tier is the base weight)
        self.tiers: dict[str, TierWeights] = {}
        self.cpu_kernels = False  # packed CPU kernels for its tiers (set by ElasticModel from its cpu_kernels)

    def forward(self, x: torch.Tensor, plan: TierPlan | None = None) -> torch.Tensor:
        """x: [B, ...] -> [B, ..., out]; `plan`: the tier of each run of rows (None: the base weight)."""
        if plan is None or self.maps is None:
            return F.linear(x, self.weight, self.bias)
        if len(plan.segments) == 1:
            return self.apply_tier(x, plan.segments[0][0].name)
        # rows grouped by tier, each group one matmul against its tier's weights
        return torch.cat([self.apply_tier(x[s:e], t.name) for t, s, e in plan.segments], dim=0)

    def apply_tier(self, x: torch.Tensor, tier: str) -> torch.Tensor:
        tw = self.tiers.get(tier)
        if tw is None:
            raise KeyError(f"tier {tier!r} is not materialized in this linear; "
                           f"materialized: {', '.join(self.tiers) or 'none'}")
        return tw.apply(x, self.bias)

    def materialize(self, spec: ElasticSpec, tier: TierSpec, backend: Backend) -> TierWeights:
        """Build (and store under `tier.name`) this linear's weights for `tier` on `backend`."""
        tw = self.build(spec, tier, backend)
        self.tiers[tier.name] = tw
        return tw

    @torch.no_grad()
    def build(self, spec: ElasticSpec, tier: TierSpec, backend: Backend) -> TierWeights:
        """This linear's weights for `tier` on `backend`, not stored: it only reads the base weight and the
        maps, so another thread may build a tier while forwards run (engine/tier_builder.py)."""
        maps = self.maps
        cpu = self.cpu_kernels and _cpu_kernels_serve(self.weight, backend)
        if maps is None or tier.kind is TierKind.DENSE and not tier.lora_groups:
            if cpu and maps is not None:  # the base weight for prefill, a bf16 copy for decode
                return _dense_cpu_tier(self.weight)
            return TierWeights(weight=self.weight)  # shares the base weight: no memory
        if cpu:  # the packers keep the mask's positions: no masked copy of the merged weight
            mask = tier_mask(spec, tier, maps.tensors, maps.name, maps.layer)
            w = merged_weight(spec, tier, maps.tensors, maps.name, maps.layer, self.weight, masked=False)
            tw = _cpu_pack(w, mask, tier)
            del w
            self._attach_lora(spec, tier, tw)
            return tw
        w = merged_weight(spec, tier, maps.tensors, maps.name, maps.layer, self.weight)  # [out, in]
        if backend == Backend.TORCH:
            w = serving_layout(w)  # merges from a relaid base come out column-major already; a guard
        tw = TierWeights(weight=w, nbytes=_nbytes(w))
        self._attach_lora(spec, tier, tw)
        if backend == Backend.TORCH:
            _attach_csr(tw, tier)
        if backend == Backend.TRITON:
            mask = tier_mask(spec, tier, maps.tensors, maps.name, maps.layer)
            if mask is not None:
                from sparsedial.kernels import pack_24, pack_bitmap

                packed = pack_24(w, mask) if tier.kind is TierKind.NM else pack_bitmap(w, mask)
                tw.weight, tw.packed = None, packed
                tw.nbytes += packed.nbytes - _nbytes(w)
        return tw

    def _attach_lora(self, spec: ElasticSpec, tier: TierSpec, tw: TierWeights) -> None:
        """Unmasked LoRA mode: the tier's low-rank path beside its sparse base."""
        maps = self.maps
        if spec.lora_mode != "unmasked" or maps is None:
            return
        groups = active_lora_groups(spec, tier, maps.tensors, maps.name, maps.layer)
        if groups:
            dt = self.weight.dtype
            tw.lora_a = torch.cat([maps.tensors[f"{maps.name}.lora.{g}.A"] for g in groups]).to(dt)
            tw.lora_b = (torch.cat([maps.tensors[f"{maps.name}.lora.{g}.B"] for g in groups], dim=1)
                         .float() * spec.lora_scale).to(dt)
            tw.nbytes += _nbytes(tw.lora_a) + _nbytes(tw.lora_b)

    def drop_tier(self, name: str) -> None:
        self.tiers.pop(name, None)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
