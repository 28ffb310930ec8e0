"""The engine's settings (`EngineConfig`) and modes (enums), torch-free: the server's settings, the CLI and
the scheduler import their defaults and documentation from here.

Each mode is a `StrEnum`, so its members compare equal to their strings ("torch" == Backend.TORCH) and
environment variables, JSON and CLI options parse into them with the value as written.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparsedial.paths import default_model

if TYPE_CHECKING:  # pragma: no cover
    from .api import PolicySpec
    from .elastic import ElasticModel


class Backend(StrEnum):
    """Where sparse tiers run. AUTO: triton on CUDA when it imports, torch otherwise."""

    AUTO = "auto"
    TORCH = "torch"
    TRITON = "triton"


class DType(StrEnum):
    """Weight/activation dtype. AUTO: float32 on CPU, bfloat16 on CUDA."""

    AUTO = "auto"
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"


class PolicyMode(StrEnum):
    """How `auto` requests get their tier: FIXED (the default tier) or LOAD (a ladder over load)."""

    FIXED = "fixed"
    LOAD = "load"


class LoadSignal(StrEnum):
    """The load a LOAD policy reads: REQUESTS (waiting + running) or KV (used fraction of KV slots)."""

    REQUESTS = "requests"
    KV = "kv"


def choices(enum: type[StrEnum]) -> list[str]:
    """The values of an enum, for CLI choices and error messages."""
    return [m.value for m in enum]


def _listed(values: list[str]) -> str:
    return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} or {values[-1]}"


def parse(enum: type[StrEnum], value: object, what: str) -> StrEnum:
    """`value` as a member of `enum`; ValueError naming `what` and the accepted values."""
    try:
        return enum(value)
    except ValueError:
        raise ValueError(f"{what} must be {_listed(choices(enum))}, got {value!r}") from None


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


def _default_policy() -> PolicySpec:
    from .api import PolicySpec

    return PolicySpec()


@dataclass(frozen=True)
class EngineConfig:
    """Settings of one serving engine: the one source of defaults and of their documentation (the server's
    settings, the CLI and the scheduler take theirs from here: `default_of`, `doc_of`)."""

    model: Path = field(default_factory=default_model, metadata=_doc(
        "Model directory: an elastic checkpoint, or a plain HF model (served at 'dense' only). Default: "
        "sparsedial.paths.default_model() (env SPARSEDIAL_MODEL, else the embedded model)."))
    backend: Backend = field(default=Backend.AUTO, metadata=_doc(
        "Sparse backend: auto (triton on CUDA when available, else torch), torch or triton."))
    dtype: DType = field(default=DType.AUTO, metadata=_doc(
        "Weight/activation dtype: auto (float32 on CPU, bfloat16 on CUDA), float32, float16 or bfloat16."))
    device: str = field(default="auto", metadata=_doc(
        "cpu, cuda, cuda:N, or auto (cuda when available)."))
    max_batch: int = field(default=16, metadata=_doc(
        "KV cache slots = most requests running at once (one decode row each per step)."))
    max_seq_len: int | None = field(default=None, metadata=_doc(
        "Context length per slot (prompt + generated tokens); None = the model's max_position_embeddings."))
    max_waiting: int = field(default=256, metadata=_doc(
        "Bound of the waiting queue; a request beyond it is refused (HTTP 429)."))
    prefill_chunk: int = field(default=256, metadata=_doc(
        "Most prompt tokens of one request computed per step (longer prompts prefill in chunks)."))
    max_step_tokens: int = field(default=1024, metadata=_doc(
        "Token budget of one step: decode rows count one each, prefill chunks the rest; >= max_batch."))
    resident_tiers: tuple[str, ...] | None = field(default=None, metadata=_doc(
        "Tiers materialized at load and never evicted; None = every tier the checkpoint lists."))
    memory_budget_mb: float | None = field(default=None, metadata=_doc(
        "Bound on memory held by materialized tiers beyond the base weights (MiB); None = no bound."))
    cache_tiers: int = field(default=4, metadata=_doc(
        "How many non-resident tiers (materialized on first use) are kept, least recently used evicted."))
    policy: PolicySpec = field(default_factory=_default_policy, metadata=_doc(
        "How `auto` requests get their tier (fixed default, or load ladder with hysteresis)."))
    model_name: str | None = field(default=None, metadata=_doc(
        "Name the model is served under; None = the model directory's name."))
    tier_builder: bool = field(default=True, metadata=_doc(
        "Build on-demand tiers on their own thread (engine/tier_builder.py); False builds them on the model "
        "thread inside a step, stalling every request in flight meanwhile (kept to measure the difference: "
        "benchmarks/bench_tier_builds.py)."))
    allow_external_base: bool = field(default=False, metadata=_doc(
        "Let an elastic checkpoint's base weights lie outside its parent folder (off: a checkpoint from "
        "elsewhere cannot make sparsedial read arbitrary files)."))
    cpu_threads: int | None = field(default=1, metadata=_doc(
        "torch intra-op threads of the model thread on CPU (None: leave torch's setting). 1 by default: on "
        "the 2-core machines measured, OpenMP teams started from a non-main thread made small matmuls 2-3x "
        "slower (docs/benchmarks.md, 'Engine thread')."))
    cpu_kernels: bool = field(default=True, metadata=_doc(
        "On CPU with the torch backend in float32, serve every tier from its packed bf16 format through the C++ "
        "kernels (kernels/cpu_*.py; a sparse tier then holds only its packed bytes, the dense tier adds a bf16 "
        "copy for decode); False keeps the fp32 path (a dense fp32 copy per sparse tier). Where the kernels "
        "cannot build the packed tiers run their torch reference (one log line)."))

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", Path(self.model))
        for name in ("max_batch", "max_step_tokens", "prefill_chunk"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.max_step_tokens < self.max_batch:
            raise ValueError(f"max_step_tokens ({self.max_step_tokens}) must be >= max_batch ({self.max_batch})")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2 or None, got {self.max_seq_len!r}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting!r}")
        if self.memory_budget_mb is not None and self.memory_budget_mb < 0:
            raise ValueError(f"memory_budget_mb must be >= 0 or None, got {self.memory_budget_mb!r}")
        if self.cache_tiers < 0:
            raise ValueError(f"cache_tiers must be >= 0, got {self.cache_tiers!r}")
        object.__setattr__(self, "backend", parse(Backend, self.backend, "backend"))
        object.__setattr__(self, "dtype", parse(DType, self.dtype, "dtype"))
        if self.resident_tiers is not None:
            object.__setattr__(self, "resident_tiers", tuple(self.resident_tiers))

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def load_model(self) -> ElasticModel:
        """Load the model these settings name (the resident tiers materialized)."""
        from .elastic import ElasticModel

        budget = None if self.memory_budget_mb is None else int(self.memory_budget_mb * 2**20)
        return ElasticModel.load(self.model, dtype=self.dtype, device=self.resolved_device(), backend=self.backend,
                                 resident=self.resident_tiers, memory_budget=budget, cache_tiers=self.cache_tiers,
                                 allow_external_base=self.allow_external_base, cpu_kernels=self.cpu_kernels)


def _field(name: str) -> dataclasses.Field:
    try:
        return next(f for f in dataclasses.fields(EngineConfig) if f.name == name)
    except StopIteration:
        raise KeyError(f"EngineConfig has no field {name!r}") from None


def default_of(name: str) -> Any:
    """The default of EngineConfig field `name` (a default_factory is called)."""
    f = _field(name)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


def doc_of(name: str) -> str:
    """The one documentation of EngineConfig field `name`."""
    return _field(name).metadata["doc"]
