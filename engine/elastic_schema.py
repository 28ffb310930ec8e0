"""The schema of elastic.json (engine/elastic_format.py), checked before any of it is used.

Two layers. Pydantic models check each field on its own (type, range, allowed values; strict, so 30 is not a
tier name and "0.3" is not a sparsity; unknown keys are refused, as the dataclass constructor refused them
before). `check_spec` then checks what spans fields: the kind-specific rules of a tier, the references from
tiers to LoRA groups, unique names and indices, and schedule lengths against the model's block count.

Every problem is reported as `<json path>: expected ..., found ...` (e.g. `tiers[2].sparsity: expected less
than 1, found 2.0`); the caller prefixes the file. The in-memory types stay the dataclasses of
elastic_format: these models exist only to validate the document.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, ValidationError

# Supported by the runtime: the 2:4 tier's mask is stored packed as mask24 and served by pack_24 / the
# 2:4 kernels (engine/linear.py); no other N:M pattern has a storage format or a kernel.
SUPPORTED_NM = (2, 4)
Fraction = Annotated[FiniteFloat, Field(ge=0.0, le=1.0)]
Index = Annotated[int, Field(ge=0)]
Percent = Annotated[int, Field(ge=0, le=99)]  # schedule entries: drop levels compare against 0..99


class _Doc(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class TierDoc(_Doc):
    name: Annotated[str, Field(min_length=1)]
    kind: Literal["dense", "unstructured", "nm"]
    sparsity: Annotated[FiniteFloat, Field(ge=0.0, lt=1.0)]
    lora_groups: list[Index] = []
    n: Index = 0
    m: Index = 0
    schedule: list[Percent] | None = None


class GroupDoc(_Doc):
    index: Index
    low: Fraction
    high: Fraction
    rank: Annotated[int, Field(ge=1)]
    nm: bool = False


class SpecDoc(_Doc):
    """elastic.json less its integrity fields (`files`, `spec_sha256`), which elastic_format checks."""

    tiers: Annotated[list[TierDoc], Field(min_length=1)]
    groups: list[GroupDoc]
    linears: list[str]
    lora_mode: Literal["masked", "unmasked"] = "masked"
    lora_scale: FiniteFloat = 1.0
    lora0_off_below: Fraction = 0.4
    importance: str = "wanda"
    method: str = "epts"
    base_model: str = ""
    base_weights: Annotated[str, Field(min_length=1)] = "model.safetensors"
    calibration: dict = {}
    compress_config: dict = {}
    format: str
    version: int


class SpecError(ValueError):
    """One schema problem: `path` (e.g. tiers[2].sparsity) and what was expected vs found."""

    def __init__(self, path: str, problem: str, more: int = 0) -> None:
        super().__init__(f"{path}: {problem}" + (f" (and {more} more)" if more else ""))


def validate_spec(doc: dict, n_layers: int | None) -> SpecDoc:
    """The validated document; raises SpecError naming the first problem. `n_layers` None: schedule
    lengths are not checked (no model config at hand)."""
    try:
        spec = SpecDoc.model_validate(doc)
    except ValidationError as e:
        errors = e.errors()
        first = errors[0]
        raise SpecError(json_path(first["loc"]), _describe(first), len(errors) - 1) from None
    check_spec(spec, n_layers)
    return spec


def json_path(loc: tuple) -> str:
    """('tiers', 2, 'sparsity') -> 'tiers[2].sparsity'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(document)"


def found(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _describe(err: dict) -> str:
    """A pydantic error as `expected ..., found ...` (its messages read "Input should be ...")."""
    kind, msg = err["type"], err["msg"]
    if kind == "missing":
        return "missing (a required field)"
    if kind == "extra_forbidden":
        return f"unexpected field, found {found(err['input'])}"
    if kind == "too_short":
        return f"expected at least {err['ctx']['min_length']} item, found {found(err['input'])}"
    return f"expected {msg.removeprefix('Input should be ')}, found {found(err['input'])}"


# --------------------------------------------------------------------------------- cross-field rules
def check_spec(spec: SpecDoc, n_layers: int | None) -> None:
    _check_groups(spec.groups)
    indices = sorted(g.index for g in spec.groups)
    seen: dict[str, int] = {}
    for i, t in enumerate(spec.tiers):
        where = f"tiers[{i}]"
        if t.name in seen:
            raise SpecError(f"{where}.name", f"duplicate tier name {t.name!r} (also tiers[{seen[t.name]}])")
        seen[t.name] = i
        _check_kind(t, where)
        _check_schedule(t, where, n_layers)
        for j, g in enumerate(t.lora_groups):
            if g not in indices:
                raise SpecError(f"{where}.lora_groups[{j}]", f"expected one of the group indices {indices} "
                                                             f"(`groups`), found {g}")
            if g in t.lora_groups[:j]:
                raise SpecError(f"{where}.lora_groups[{j}]", f"duplicate group {g}")


def _check_groups(groups: list[GroupDoc]) -> None:
    seen: dict[int, int] = {}
    for i, g in enumerate(groups):
        if g.index in seen:
            raise SpecError(f"groups[{i}].index", f"duplicate group index {g.index} (also groups[{seen[g.index]}])")
        seen[g.index] = i
        # an unstructured group covers (low, high]; the 2:4 group is pinned at one sparsity (low == high)
        if g.high < g.low or (g.high == g.low and not g.nm):
            rel = "at least" if g.nm else "more than"
            raise SpecError(f"groups[{i}].high", f"expected {rel} low {g.low}, found {g.high}")


def _check_kind(t: TierDoc, where: str) -> None:
    """What each kind of tier means to the runtime (elastic_format.tier_mask, linear.ElasticLinear)."""
    if t.kind == "nm":
        for field, want in zip(("n", "m"), SUPPORTED_NM):
            if getattr(t, field) != want:
                raise SpecError(f"{where}.{field}", f"expected {want} (only {SUPPORTED_NM[0]}:{SUPPORTED_NM[1]} "
                                                    f"is supported), found {getattr(t, field)}")
        want_s = 1 - SUPPORTED_NM[0] / SUPPORTED_NM[1]
        if t.sparsity != want_s:
            raise SpecError(f"{where}.sparsity", f"expected {want_s} for a 2:4 tier, found {t.sparsity}")
        return
    for field in ("n", "m"):  # only meaningful for N:M; a stray value hints at a mislabelled kind
        if getattr(t, field) != 0:
            raise SpecError(f"{where}.{field}", f"expected 0 for a {t.kind} tier, found {getattr(t, field)}")
    if t.kind == "dense" and t.sparsity != 0:
        raise SpecError(f"{where}.sparsity", f"expected 0.0 for a dense tier, found {t.sparsity}")
    if t.kind == "unstructured" and not 1 <= round(t.sparsity * 100) <= 99:
        # tier_mask compares drop levels against the whole percent; 0% would be a mislabelled dense tier
        raise SpecError(f"{where}.sparsity", f"expected 0.01..0.99 for an unstructured tier, found {t.sparsity}")


def _check_schedule(t: TierDoc, where: str, n_layers: int | None) -> None:
    if t.schedule is None:
        return
    if t.kind != "unstructured":  # only unstructured tiers read a per-block schedule (OWL)
        raise SpecError(f"{where}.schedule", f"expected null for a {t.kind} tier, found {found(t.schedule)}")
    if n_layers is not None and len(t.schedule) != n_layers:
        raise SpecError(f"{where}.schedule", f"expected {n_layers} entries (num_hidden_layers in config.json), "
                                             f"found {len(t.schedule)}")
