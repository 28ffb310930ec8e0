"""The tier concept, in one place: what a tier is, how a request names one, and the per-row plan of a forward.

A tier is one operating point of an elastic model (`TierSpec`): `dense` (the base weights, always
served), an unstructured sparsity `"<n>%"` (nested masks: every whole percent from 1% to the checkpoint's
largest listed sparsity is exact, see elastic_format), or an N:M tier (`"2:4"`).

How a request names a tier (`Tiers.resolve`, the only parser; the compressor's tier list uses the same
rules through `parse_tier_name`):
- absent, None or `"auto"`: auto (the engine's tier policy decides at admission);
- a tier name of the checkpoint (`"dense"`, `"2:4"`, `"30%"` ...);
- `"<x>%"` or a number in [0, 1]: a sparsity, snapped to the nearest whole percent (`"45.4%"` -> 45%,
  0.451 -> 45%); 0 is dense; above the largest unstructured sparsity of the checkpoint it is an error.
The compressor is strict where the engine snaps: a tier it is asked to write must be a whole percent from
1% to 99% (`strict=True`), since a tier it would write under another name than asked is a surprise.

A request's tier is resolved once, at admission, into a `TierSpec`; each forward then gets a `TierPlan`
(the tier of each contiguous run of rows), passed explicitly from the runner through `Transformer.forward`
to every `ElasticLinear`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from .api import UnknownTierError

if TYPE_CHECKING:  # pragma: no cover
    from .elastic_format import LoraGroup

DENSE = "dense"
AUTO = "auto"
NM_TIERS = {"2:4": (2, 4)}  # the N:M patterns the compressor writes and the kernels run


class TierKind(StrEnum):
    DENSE = "dense"
    UNSTRUCTURED = "unstructured"
    NM = "nm"


@dataclass(frozen=True)
class TierSpec:
    """One operating point. `sparsity` is the nominal fraction; `schedule` optionally overrides it per
    decoder block (OWL), each entry an integer percent. `lora_groups`: the hierarchical LoRA groups it uses."""

    name: str  # "dense", "30%", "2:4"
    kind: TierKind
    sparsity: float
    lora_groups: tuple[int, ...] = ()
    n: int = 0  # N:M tiers only
    m: int = 0
    schedule: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", TierKind(self.kind))

    def block_percent(self, layer: int) -> int:
        """Integer sparsity percent of decoder block `layer` for unstructured tiers."""
        if self.schedule is not None:
            return self.schedule[layer]
        return round(self.sparsity * 100)


def percent_name(percent: int) -> str:
    """The tier name of an unstructured tier: 45 -> "45%"."""
    return f"{percent}%"


def slug(name: str) -> str:
    """A file-system-safe form of a tier name: "50%" -> "50pct", "2:4" -> "2-4"."""
    return name.replace("%", "pct").replace(":", "-")


def as_fraction(requested: object) -> float | None:
    """"45%" -> 0.45, "0.45" / 0.45 -> 0.45; None when not a finite number (bools are not numbers here)."""
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


def looks_like_tier(requested: object) -> bool:
    """Whether `requested` has the syntax of a tier request (before any model is loaded, e.g. a server
    setting): "auto", "dense", an N:M name, "<x>%" or a number in [0, 1]. Whether a model serves it is
    `Tiers.resolve`'s business."""
    if not isinstance(requested, str):
        return False
    text = requested.strip()
    if text in (AUTO, DENSE) or re.fullmatch(r"\d+:\d+", text):
        return True
    value = as_fraction(text)
    return value is not None and 0.0 <= value <= 1.0


def groups_for_sparsity(groups: Sequence[LoraGroup], sparsity: float) -> tuple[int, ...]:
    """Hierarchical LoRA: an unstructured tier at s uses every unstructured group up to the one whose
    interval (low, high] holds s; none at s = 0 or above the last group (as the EPTS reference)."""
    unstructured = sorted((g for g in groups if not g.nm), key=lambda g: g.high)
    if sparsity <= 0 or not unstructured or sparsity > unstructured[-1].high + 1e-9:
        return ()
    out = []
    for g in unstructured:
        out.append(g.index)
        if sparsity <= g.high + 1e-9:
            break
    return tuple(out)


def groups_for_nm(groups: Sequence[LoraGroup], sparsity: float = 0.5) -> tuple[int, ...]:
    """The N:M tier: the unstructured groups up to its nominal sparsity, plus its own group."""
    own = tuple(g.index for g in groups if g.nm)
    return (groups_for_sparsity(groups, sparsity) + own) if own else ()


def dense_tier() -> TierSpec:
    return TierSpec(DENSE, TierKind.DENSE, 0.0)


def unstructured_tier(percent: int, groups: Sequence[LoraGroup]) -> TierSpec:
    s = percent / 100
    return TierSpec(percent_name(percent), TierKind.UNSTRUCTURED, s, groups_for_sparsity(groups, s))


def parse_tier_name(name: str, groups: Sequence[LoraGroup] = ()) -> TierSpec:
    """The tier a compressor is asked to write (strict: "dense", "<n>%" with n a whole number in 1..99, or an
    N:M name of NM_TIERS); ValueError saying what is accepted."""
    text = name.strip() if isinstance(name, str) else name
    if text == DENSE:
        return dense_tier()
    if isinstance(text, str) and text in NM_TIERS:
        n, m = NM_TIERS[text]
        return TierSpec(text, TierKind.NM, 1 - n / m, groups_for_nm(groups, 1 - n / m), n=n, m=m)
    value = as_fraction(text) if isinstance(text, str) and text.endswith("%") else None
    if value is None:
        raise ValueError(f"tier {name!r} is not 'dense', '<n>%' or one of {', '.join(NM_TIERS)}")
    percent = value * 100
    if abs(percent - round(percent)) > 1e-9:
        raise ValueError(f"tier {name!r}: expected a whole percent like 50%")
    if not 1 <= round(percent) <= 99:
        raise ValueError(f"tier {name!r}: percent must be in 1..99")
    return unstructured_tier(round(percent), groups)


def tiers_from_names(names: Iterable[str], groups: Sequence[LoraGroup] = ()) -> list[TierSpec]:
    """The tier list a compressor writes: `parse_tier_name` of each, dense always first (the base weights are
    always there, so dense is always a tier); ValueError on a duplicate."""
    names = list(names)
    tiers = [parse_tier_name(n, groups) for n in names]
    seen = [t.name for t in tiers]
    if len(set(seen)) != len(seen):
        raise ValueError(f"duplicate tiers in {', '.join(names)}")
    if DENSE not in seen:
        tiers.insert(0, dense_tier())
    return tiers


class Tiers:
    """The tiers one model serves: the checkpoint's listed tiers (dense always among them) plus every whole
    percent up to its largest unstructured sparsity, made on first request. `resolve` is the one parser of
    tier requests (module docstring)."""

    def __init__(self, listed: Iterable[TierSpec], groups: Sequence[LoraGroup] = ()) -> None:
        listed = list(listed)
        if not any(t.name == DENSE for t in listed):
            listed.insert(0, dense_tier())
        self.groups = tuple(groups)
        self._listed = [t.name for t in listed]
        self._specs: dict[str, TierSpec] = {t.name: t for t in listed}
        self.max_sparsity = max((t.sparsity for t in listed if t.kind is TierKind.UNSTRUCTURED), default=0.0)

    @property
    def names(self) -> list[str]:
        """The listed tier names, in the checkpoint's order (dense first when the checkpoint did not list it)."""
        return list(self._listed)

    def get(self, name: str) -> TierSpec:
        """The tier called `name` (listed, or a percent resolved before); UnknownTierError otherwise."""
        try:
            return self._specs[name]
        except KeyError:
            raise UnknownTierError(name, self.names, round(self.max_sparsity * 100)) from None

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def resolve(self, requested: object) -> TierSpec | None:
        """The tier `requested` names, or None for auto; UnknownTierError listing what is served."""
        if isinstance(requested, TierSpec):  # already resolved (by this catalogue: checked, not re-parsed)
            if self.resolve(requested.name) != requested:
                raise UnknownTierError(requested.name, self.names, round(self.max_sparsity * 100))
            return requested
        if requested is None or isinstance(requested, str) and requested.strip() == AUTO:
            return None
        if isinstance(requested, str) and requested.strip() in self._specs:
            return self._specs[requested.strip()]
        value = as_fraction(requested)
        if value is None or not 0.0 <= value <= self.max_sparsity + 1e-9:
            raise UnknownTierError(requested, self.names, round(self.max_sparsity * 100))
        percent = round(value * 100)
        if percent == 0:
            return self._specs[DENSE]
        name = percent_name(percent)
        if name not in self._specs:
            self._specs[name] = unstructured_tier(percent, self.groups)
        return self._specs[name]


@dataclass(frozen=True)
class TierPlan:
    """The tier of each row of one forward, as contiguous row ranges `(tier, start, end)` over dim 0."""

    segments: tuple[tuple[TierSpec, int, int], ...]

    @classmethod
    def from_rows(cls, tiers: Sequence[TierSpec]) -> TierPlan:
        """One segment per run of equal consecutive tiers (callers sort rows by tier to get few runs)."""
        segments: list[tuple[TierSpec, int, int]] = []
        for i, t in enumerate(tiers):
            if segments and segments[-1][0].name == t.name:
                segments[-1] = (segments[-1][0], segments[-1][1], i + 1)
            else:
                segments.append((t, i, i + 1))
        return cls(tuple(segments))

    @classmethod
    def single(cls, tier: TierSpec, rows: int = 1) -> TierPlan:
        """Every row at `tier` (the row count only matters to a reader of `segments`)."""
        return cls(((tier, 0, rows),))

    @property
    def names(self) -> set[str]:
        return {t.name for t, _, _ in self.segments}
