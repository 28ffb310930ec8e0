"""ElasticModel: one loaded elastic checkpoint serving every tier, with resident and on-demand tiers.

Loading (the compressor writes, the engine converts for its backend at load: separate phases): the dense
base through `loader.load_model`, the elastic tensors through `read_elastic` + `validate_tensors` (the one
reader of the checkpoint); each `ElasticLinear` then gets its maps, and the resident tiers are materialized
for the backend. A plain HF directory loads too and serves only "dense"; "dense" is always a tier.

Tier requests (`resolve`) follow engine/tiers.py: a percent the spec does not list is materialized on
demand from the drop levels, with the LoRA groups of `tiers.groups_for_sparsity`. Forwards take a
`TierPlan` (`model(..., plan=...)`); `ensure` makes a step's tiers resident first, once per step.
Non-resident tiers live in an LRU cache bounded by a count and by the memory budget.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .elastic_format import ElasticSpec, is_elastic, read_elastic, validate_tensors
from .linear import ElasticLinear, LinearMaps, TierWeights, packed_head, serving_layout
from .loader import LoadedModel, load_model
from .options import Backend, DType, parse
from .tiers import Tiers, TierSpec, dense_tier

_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def choose_backend(requested: Backend | str, device: torch.device) -> Backend:
    """`auto`: triton on CUDA when triton imports, torch otherwise (never triton off CUDA). `triton` needs
    CUDA, or, for testing on a CPU, Triton's interpreter: TRITON_INTERPRET=1 set before the kernels are first
    imported (kernels._launch.interpreter_enabled; tests/kernels/conftest.py)."""
    requested = parse(Backend, requested, "backend")
    from sparsedial.kernels._launch import interpreter_enabled  # no triton import

    if requested == "triton" and device.type != "cuda" and not interpreter_enabled():
        raise ValueError(f"backend 'triton' needs a CUDA device (or TRITON_INTERPRET=1 to test it on a CPU), "
                         f"got device {device}")
    if requested is Backend.TORCH or requested is Backend.AUTO and device.type != "cuda":
        return Backend.TORCH
    try:
        import triton  # noqa: F401
    except ImportError:
        if requested is Backend.TRITON:
            raise ValueError("backend 'triton' needs the triton package (pip install triton)") from None
        return Backend.TORCH
    return Backend.TRITON


class ElasticModel:
    """A Transformer whose ElasticLinears serve the tiers of `spec`; see the module docstring."""

    def __init__(self, lm: LoadedModel, spec: ElasticSpec, tensors: dict[str, torch.Tensor], backend: Backend,
                 resident: Iterable[str] | None = None, memory_budget: int | None = None,
                 cache_tiers: int = 4, cpu_kernels: bool = False) -> None:
        self.lm, self.model, self.tokenizer, self.config = lm, lm.model, lm.tokenizer, lm.config
        self.spec, self.backend = spec, backend
        self.memory_budget, self.cache_tiers = memory_budget, cache_tiers
        self.catalog = Tiers(spec.tiers, spec.groups)
        self._linears: list[ElasticLinear] = []
        self._attach(tensors, cpu_kernels)
        self._relayout()
        self.head_bytes = 0  # bytes of a bf16 copy of the LM head (CPU kernels), beyond the base weights
        head = packed_head(self.model.lm_head, backend) if cpu_kernels else None
        if head is not None:
            self.model.lm_head, self.head_bytes = head, head.nbytes
        self.tier_bytes: dict[str, int] = {}  # materialized tier -> bytes it owns
        self._resident: list[str] = []
        self._cache: OrderedDict[str, None] = OrderedDict()  # non-resident tiers, least recently used first
        for name in (self.tiers if resident is None else list(resident)):
            self.add_resident(name)

    # ----------------------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: str | Path, *, dtype: DType | torch.dtype = "auto", device: str | torch.device = "cpu",
             backend: Backend | str = "auto", resident: Iterable[str] | None = None,
             memory_budget: int | None = None, cache_tiers: int = 4,
             allow_external_base: bool = False, cpu_kernels: bool = False) -> ElasticModel:
        """Load an elastic checkpoint (or a plain HF model, served as "dense" only). `allow_external_base`:
        its base weights may lie outside the checkpoint's parent folder (elastic_format.resolve_base_weights).
        `cpu_kernels`: on a CPU in fp32, tiers in the packed formats of the C++ kernels (engine/linear.py);
        False keeps the fp32 path (EngineConfig turns it on by default)."""
        path, device = Path(path), torch.device(device)
        lm = load_model(path, dtype=dtype, device=device, allow_external_base=allow_external_base)
        if not is_elastic(path):
            spec = ElasticSpec(tiers=[dense_tier()], groups=[], linears=[])
            return cls(lm, spec, {}, choose_backend(backend, device), resident, memory_budget, cache_tiers,
                       cpu_kernels)
        spec, tensors = read_elastic(path, allow_external_base=allow_external_base)
        shapes = {n: tuple(m.weight.shape) for n, m in lm.model.named_modules() if isinstance(m, ElasticLinear)}
        validate_tensors(spec, tensors, shapes, path / "elastic.safetensors")
        tensors = {k: v.to(device) for k, v in tensors.items()}
        return cls(lm, spec, tensors, choose_backend(backend, device), resident, memory_budget, cache_tiers,
                   cpu_kernels)

    def _attach(self, tensors: dict[str, torch.Tensor], cpu_kernels: bool) -> None:
        listed = set(self.spec.linears)
        for name, mod in self.model.named_modules():
            if not isinstance(mod, ElasticLinear):
                continue
            mod.cpu_kernels = cpu_kernels
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
        """The tier names the checkpoint lists, in order (dense first when it did not list it)."""
        return self.catalog.names

    @property
    def max_sparsity(self) -> float:
        """Largest unstructured sparsity served (0 when there is none)."""
        return self.catalog.max_sparsity

    @property
    def resident(self) -> list[str]:
        return list(self._resident)

    def tier_spec(self, name: str) -> TierSpec:
        return self.catalog.get(name)

    def resolve(self, requested: object) -> TierSpec | None:
        """The tier `requested` names, or None for auto; raises UnknownTierError (engine/tiers.py)."""
        return self.catalog.resolve(requested)

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
            if name not in needed:
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
            if name not in in_use:
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


@dataclass(frozen=True)
class BuiltTier:
    """One tier's weights for every ElasticLinear of a model (in ElasticModel's linear order)."""

    name: str
    weights: list[TierWeights]
