"""ElasticModel: one loaded elastic checkpoint serving every tier, with resident and on-demand tiers.

Loading (the compressor writes, the engine converts for its backend at load: separate phases): the dense
base through `loader.load_model`, the elastic tensors through `read_elastic` + `validate_tensors`; each `ElasticLinear`
then gets its maps and a shared `TierContext`, and the resident tiers are materialized for the backend.
A plain HF directory loads too and serves only "dense".

Tier requests (`resolve`): a tier name of the spec, "<n>%" or a float in [0, max unstructured sparsity].
Numbers snap to the nearest integer percent; a percent the spec does not list is materialized on demand
from the drop levels (every integer percent is exact, see elastic_format), with the LoRA groups of
`elastic_format.groups_for_sparsity` (nested: tier s in group k uses groups 0..k).
Non-resident tiers live in an LRU cache bounded by a count and by the memory budget.
"""

from __future__ import annotations

import math
import re
import shutil
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from sparsedial.errors import ModelLoadError

from .api import UnknownTierError
from .elastic_format import (
    LINEAR_NAMES,
    NEVER_DROPPED,
    ElasticSpec,
    LoraGroup,
    TierSpec,
    groups_for_sparsity,
    is_elastic,
    keep_count,
    pack_mask24,
    rank_from_scores,
    read_elastic,
    validate_tensors,
    write_elastic,
)
from .linear import Backend, ElasticLinear, LinearMaps, TierContext, TierPlan, TierWeights, serving_layout
from .loader import DType, LoadedModel, load_model

BackendChoice = Literal["auto", "torch", "triton"]
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def choose_backend(requested: BackendChoice, device: torch.device) -> Backend:
    """`auto`: triton on CUDA when triton imports, torch otherwise (never triton off CUDA). `triton` needs
    CUDA, or, for testing on a CPU, Triton's interpreter: TRITON_INTERPRET=1 set before the kernels are first
    imported (kernels._launch.interpreter_enabled; tests/kernels/conftest.py)."""
    if requested not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be auto, torch or triton, got {requested!r}")
    from sparsedial.kernels._launch import interpreter_enabled  # no triton import

    if requested == "triton" and device.type != "cuda" and not interpreter_enabled():
        raise ValueError(f"backend 'triton' needs a CUDA device (or TRITON_INTERPRET=1 to test it on a CPU), "
                         f"got device {device}")
    if requested == "torch" or requested == "auto" and device.type != "cuda":
        return "torch"
    try:
        import triton  # noqa: F401
    except ImportError:
        if requested == "triton":
            raise ValueError("backend 'triton' needs the triton package (pip install triton)") from None
        return "torch"
    return "triton"


class ElasticModel:
    """A Transformer whose ElasticLinears serve the tiers of `spec`; see the module docstring."""

    def __init__(self, lm: LoadedModel, spec: ElasticSpec, tensors: dict[str, torch.Tensor], backend: Backend,
                 resident: Iterable[str] | None = None, memory_budget: int | None = None,
                 cache_tiers: int = 4) -> None:
        self.lm, self.model, self.tokenizer, self.config = lm, lm.model, lm.tokenizer, lm.config
        self.spec, self.backend = spec, backend
        self.memory_budget, self.cache_tiers = memory_budget, cache_tiers
        self.context = TierContext(default=spec.tiers[0].name)
        self._specs: dict[str, TierSpec] = {t.name: t for t in spec.tiers}
        self._linears: list[ElasticLinear] = []
        self._attach(tensors)
        self._relayout()
        self.tier_bytes: dict[str, int] = {}  # materialized tier -> bytes it owns
        self._resident: list[str] = []
        self._cache: OrderedDict[str, None] = OrderedDict()  # non-resident tiers, least recently used first
        for name in (self.tiers if resident is None else list(resident)):
            self.add_resident(name)

    # ----------------------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: str | Path, *, dtype: DType | torch.dtype = "auto", device: str | torch.device = "cpu",
             backend: BackendChoice = "auto", resident: Iterable[str] | None = None,
             memory_budget: int | None = None, cache_tiers: int = 4,
             allow_external_base: bool = False) -> ElasticModel:
        """Load an elastic checkpoint (or a plain HF model, served as "dense" only). `allow_external_base`:
        its base weights may lie outside the checkpoint's parent folder (elastic_format.resolve_base_weights)."""
        path, device = Path(path), torch.device(device)
        lm = load_model(path, dtype=dtype, device=device, allow_external_base=allow_external_base)
        if not is_elastic(path):
            spec = ElasticSpec(tiers=[TierSpec("dense", "dense", 0.0)], groups=[], linears=[])
            return cls(lm, spec, {}, choose_backend(backend, device), resident, memory_budget, cache_tiers)
        spec, tensors = read_elastic(path, allow_external_base=allow_external_base)
        shapes = {n: tuple(m.weight.shape) for n, m in lm.model.named_modules() if isinstance(m, ElasticLinear)}
        validate_tensors(spec, tensors, shapes, path / "elastic.safetensors")
        if not spec.tiers:
            raise ModelLoadError(f"{path / 'elastic.json'}: the spec lists no tiers")
        tensors = {k: v.to(device) for k, v in tensors.items()}
        return cls(lm, spec, tensors, choose_backend(backend, device), resident, memory_budget, cache_tiers)

    def _attach(self, tensors: dict[str, torch.Tensor]) -> None:
        listed = set(self.spec.linears)
        for name, mod in self.model.named_modules():
            if not isinstance(mod, ElasticLinear):
                continue
            mod.context = self.context
            if name in listed:
                m = _LAYER.match(name)
                prefix = name + "."
                mod.maps = LinearMaps(name, int(m.group(1)) if m else 0,
                                      {k: v for k, v in tensors.items() if k.startswith(prefix)})
            self._linears.append(mod)

    def _relayout(self) -> None:
        """Base weights of the projections and the LM head in their serving layout (linear.serving_layout).
        A tied embedding shares the LM head's storage and gathers its rows strided: a few microseconds per
        decode step, a few percent of a long prefill; a row-major copy would cost vocab x hidden more
        memory. The model's state dict is then non-contiguous: exporters must call .contiguous()."""
        heads = [self.model.lm_head] if isinstance(self.model.lm_head, torch.nn.Linear) else []
        for mod in [*self._linears, *heads]:
            mod.weight.data = serving_layout(mod.weight.data)

    # ----------------------------------------------------------------------------------------- tiers
    @property
    def tiers(self) -> list[str]:
        """The spec's tier names, in order."""
        return [t.name for t in self.spec.tiers]

    @property
    def max_sparsity(self) -> float:
        """Largest unstructured sparsity served (0 when there is none)."""
        return max((t.sparsity for t in self.spec.tiers if t.kind == "unstructured"), default=0.0)

    @property
    def resident(self) -> list[str]:
        return list(self._resident)

    @property
    def default_tier(self) -> str:
        return self.context.default

    def tier_spec(self, name: str) -> TierSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise UnknownTierError(name, self.tiers) from None

    def resolve(self, requested: object) -> str | None:
        """A tier name for `requested`, or None for auto; raises UnknownTierError (see module doc)."""
        if requested is None or requested == "auto":
            return None
        if isinstance(requested, str) and requested.strip() in self._specs:
            return requested.strip()
        value = _as_fraction(requested)
        if value is None or not 0.0 <= value <= self.max_sparsity + 1e-9:
            raise UnknownTierError(requested, self.tiers, round(self.max_sparsity * 100))
        percent = round(value * 100)
        if percent == 0:
            if "dense" not in self._specs:
                raise UnknownTierError(requested, self.tiers)
            return "dense"
        name = f"{percent}%"
        if name not in self._specs:
            self._specs[name] = self._percent_tier(percent)
        return name

    def _percent_tier(self, percent: int) -> TierSpec:
        s = percent / 100
        return TierSpec(f"{percent}%", "unstructured", s, lora_groups=groups_for_sparsity(self.spec.groups, s))

    def set_default_tier(self, name: str) -> None:
        """Make `name` the tier of rows without a plan: a pointer change when it is resident."""
        self.tier_spec(name)
        self.ensure([name])
        self.context.default = name

    def add_resident(self, name: str) -> None:
        """Materialize `name` and keep it (never evicted); raises ValueError when over the memory budget."""
        spec = self.tier_spec(name)
        if name in self._resident:
            return
        self._cache.pop(name, None)
        if name not in self.tier_bytes:
            self._materialize(spec)
        self._resident.append(name)
        if self.memory_budget is not None and self.memory_used > self.memory_budget:
            used = self.memory_used
            self.drop_tier(name)
            raise ValueError(f"resident tier {name!r} does not fit the memory budget: {used} bytes of tiers > "
                             f"budget {self.memory_budget} bytes")

    def ensure(self, names: Iterable[str], evict: bool = True) -> None:
        """Materialize the tiers a step needs (LRU cache for non-resident ones), evicting unneeded ones
        (`evict=False`: never evict; the serving engine evicts through `make_room`, on its own terms)."""
        needed = set(names)
        for name in needed:
            if name in self._resident:
                continue
            if name in self._cache:
                self._cache.move_to_end(name)
            else:
                self._materialize(self.tier_spec(name))
                self._cache[name] = None
        if not evict:
            return
        for name in list(self._cache):
            over = len(self._cache) > self.cache_tiers or (
                self.memory_budget is not None and self.memory_used > self.memory_budget)
            if not over:
                break
            if name not in needed and name != self.context.default:
                self.drop_tier(name)

    def _materialize(self, spec: TierSpec) -> None:
        self._install(self.build_tier(spec.name))

    # ------------------------------------------------------------------ tiers built beside the model thread
    def build_tier(self, name: str) -> BuiltTier:
        """Every linear's weights of tier `name`, computed but not installed. Reads only base weights and maps,
        so a builder thread may run it while the model thread runs forwards."""
        spec = self.tier_spec(name)
        return BuiltTier(name, [lin.build(self.spec, spec, self.backend) for lin in self._linears])

    def install_tier(self, built: BuiltTier) -> None:
        """Make a built tier usable (a cached, evictable tier): dict stores only, cheap."""
        if built.name in self.tier_bytes:
            return
        self._install(built)
        self._cache[built.name] = None

    def _install(self, built: BuiltTier) -> None:
        for lin, tw in zip(self._linears, built.weights):
            lin.tiers[built.name] = tw
        self.tier_bytes[built.name] = sum(tw.nbytes for tw in built.weights)

    def is_ready(self, name: str) -> bool:
        """True when `name` is materialized (a forward at that tier needs no build)."""
        return name in self.tier_bytes

    def make_room(self, in_use: set[str]) -> bool:
        """Evict cached tiers outside `in_use` (least recently used first) until one more tier fits the cache
        count (at least one on-demand tier is always allowed) and the memory budget; False when the tiers in
        use fill it (the caller waits for one to be released)."""
        def full() -> bool:
            return len(self._cache) >= max(1, self.cache_tiers) or (
                self.memory_budget is not None and self.memory_used > self.memory_budget)

        for name in list(self._cache):
            if not full():
                break
            if name not in in_use and name != self.context.default:
                self.drop_tier(name)
        return not full()

    def drop_tier(self, name: str) -> None:
        for lin in self._linears:
            lin.drop_tier(name)
        self.tier_bytes.pop(name, None)
        self._cache.pop(name, None)
        if name in self._resident:
            self._resident.remove(name)

    @property
    def materialized(self) -> list[str]:
        return list(self.tier_bytes)

    @property
    def memory_used(self) -> int:
        """Bytes held by materialized tiers beyond the base weights."""
        return sum(self.tier_bytes.values())

    @contextmanager
    def plan(self, plan: TierPlan | None, evict: bool = True) -> Iterator[None]:
        """Run the forwards inside with this per-row tier plan (its tiers materialized if needed)."""
        if plan is not None:
            self.ensure(plan.tiers, evict=evict)
        self.context.plan = plan
        try:
            yield
        finally:
            self.context.plan = None


@dataclass(frozen=True)
class BuiltTier:
    """One tier's weights for every ElasticLinear of a model (in ElasticModel's linear order)."""

    name: str
    weights: list[TierWeights]


def _as_fraction(requested: object) -> float | None:
    """"45%" -> 0.45, "0.45" / 0.45 -> 0.45; None when not a finite number."""
    if isinstance(requested, bool):
        return None
    if isinstance(requested, (int, float)):
        value = float(requested)
    elif isinstance(requested, str):
        text = requested.strip()
        try:
            value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            return None
    else:
        return None
    return value if math.isfinite(value) else None


# --------------------------------------------------------------------------------- synthetic checkpoints
DEFAULT_TIERS = (("dense", 0.0), ("30%", 0.3), ("40%", 0.4), ("50%", 0.5), ("60%", 0.6), ("70%", 0.7))


def fast_drop_levels(rank: torch.Tensor) -> torch.Tensor:
    """elastic_format.drop_levels_from_rank without its [out, in, 100] intermediate (same result)."""
    keeps = torch.tensor([keep_count(rank.shape[1], p / 100) for p in range(100, 0, -1)])  # ascending
    level = 101 - torch.searchsorted(keeps, rank.contiguous(), right=True)  # 1 + #percents with keep > r
    return torch.where(level > 100, NEVER_DROPPED, level).to(torch.uint8)


def synthetic_linear_maps(name: str, w: torch.Tensor, groups: list[LoraGroup], g: torch.Generator, *,
                          lora_std: float, with_24: bool = True, lora0_off: bool = False) -> dict[str, torch.Tensor]:
    """Random-but-valid elastic maps of one linear `name` with weight `w` [out, in], computed on w's device
    with generator `g` (same device): drop levels from |W| x U(0.5, 1.5), the top-2-of-4 2:4 mask of the same
    scores, random LoRA factors per group, the LoRA_0 flag. Not a pruning method: tests and benchmarks only."""
    out_f, in_f = w.shape
    scores = w.float().abs() * (0.5 + torch.rand(out_f, in_f, generator=g, device=w.device))
    with torch.device(w.device):  # fast_drop_levels builds its percent table with torch.tensor
        maps = {f"{name}.drop_level": fast_drop_levels(rank_from_scores(scores))}
    if with_24:
        keep = scores.view(out_f, in_f // 4, 4).argsort(-1, descending=True).argsort(-1) < 2  # 2 of every 4
        maps[f"{name}.mask24"] = pack_mask24(keep.reshape(out_f, in_f))
    for grp in groups:
        maps[f"{name}.lora.{grp.index}.A"] = torch.randn(grp.rank, in_f, generator=g, device=w.device) * lora_std
        maps[f"{name}.lora.{grp.index}.B"] = torch.randn(out_f, grp.rank, generator=g, device=w.device) * lora_std
    maps[f"{name}.lora0_off"] = torch.tensor(lora0_off, dtype=torch.uint8)
    return maps


def write_synthetic_elastic(base_dir: str | Path, out_dir: str | Path, *, seed: int = 0, lora_rank: int = 4,
                            lora_mode: Literal["masked", "unmasked"] = "masked", lora_std: float = 0.05,
                            with_24: bool = True) -> Path:
    """A random-but-valid elastic checkpoint next to a copy of `base_dir`: random scores -> ranks -> drop
    levels, random 2:4 masks, random LoRA groups. For tests and benchmarks only (not a compressed model)."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in base_dir.iterdir():
        if f.is_file() and f.name not in ("elastic.json", "elastic.safetensors"):
            shutil.copy(f, out_dir / f.name)
    lm = load_model(out_dir, dtype=torch.float32, with_tokenizer=False)
    groups = [LoraGroup(0, 0.0, 0.4, lora_rank), LoraGroup(1, 0.4, 0.7, lora_rank)]
    tiers = [TierSpec(n, "dense" if s == 0 else "unstructured", s,
                      lora_groups=() if s == 0 else ((0,) if s <= 0.4 else (0, 1))) for n, s in DEFAULT_TIERS]
    if with_24:
        groups.append(LoraGroup(2, 0.5, 0.5, lora_rank, nm=True))
        tiers.append(TierSpec("2:4", "nm", 0.5, lora_groups=(2,), n=2, m=4))
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    linears = [f"model.layers.{i}.{n}" for i in range(lm.config.num_hidden_layers) for n in LINEAR_NAMES]
    weights = dict(lm.model.named_parameters())
    for i, name in enumerate(linears):
        tensors |= synthetic_linear_maps(name, weights[f"{name}.weight"], groups, g, lora_std=lora_std,
                                         with_24=with_24, lora0_off=i % 3 == 0)
    spec = ElasticSpec(tiers=tiers, groups=groups, linears=linears, lora_mode=lora_mode, importance="random",
                       method="synthetic", base_model=str(base_dir))
    write_elastic(out_dir, spec, tensors)
    return out_dir
