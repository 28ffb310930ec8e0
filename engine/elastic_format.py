"""The elastic checkpoint: one directory that serves every sparsity tier of a model.

Layout (safetensors only, no pickle; decisions in docs/architecture.md, "Elastic checkpoint"):

    config.json, tokenizer files, generation_config.json   copied from the base model (HF layout)
    model.safetensors                                      the dense base weights (HF names)
    elastic.safetensors                                    per linear `<name>` (e.g. model.layers.0.mlp.up_proj):
        <name>.drop_level   uint8 [out, in]   the smallest sparsity percent (1..100) at which the weight is
                                              pruned; 255 = never (the row's top weight)
        <name>.mask24       uint8 [out, in/4] bit j of byte g set = input 4g+j kept in the 2:4 tier (if any)
        <name>.lora.<g>.A   [r_g, in]         LoRA group g (fp32 or the base dtype)
        <name>.lora.<g>.B   [out, r_g]
        <name>.lora0_off    uint8 []          1 = LoRA group 0 disabled for this block at s <= lora0_off_below
    elastic.json                                           ElasticSpec below, plus sha256 of every file
                                                           (`files`) and of itself (`spec_sha256`)

Nested masks from a per-row rank r (0 = most important) keep `keep(s) = max(1, int(in * (1 - s)))` weights,
so the weight is pruned at s exactly when r >= keep(s). Storing the first integer percent at which that
happens (the drop level) costs one byte per weight and reproduces every integer-percent tier exactly:
kept at p% <=> drop_level > p.

A tier's merged weight (masked LoRA mode, EPTS):  W_t = (W + sum_{g in tier.lora_groups} B_g A_g) * M_t.
In unmasked mode the delta runs beside the sparse base at run time: y = x (W * M_t)^T + x A^T B^T.

Integrity (read_elastic). elastic.json is checked against its schema (engine/elastic_schema.py) and must
carry its integrity data: `files` (name -> sha256, never empty; it must cover config.json,
elastic.safetensors and the base weights the loader reads) and `spec_sha256`, the sha256 of the document
without that field serialized canonically (`canonical_json`), so a hand edit is detected; re-seal a
deliberate edit with `write_elastic_json`. The seal is integrity, not authenticity: whoever can write the
folder can re-seal it, which is why the schema and the tensor checks run regardless. Listed files must lie
inside the checkpoint folder; the base weights (`base_weights`) inside it or under its parent folder (a
sibling base model, as ../stdlib-tiny/model.safetensors), after resolving symlinks and `..`, unless the
caller passes allow_external_base=True. Every floating-point tensor must be finite.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sparsedial.errors import ModelLoadError

from .elastic_schema import SpecError, validate_spec
from .elastic_schema import found as found_text
from .tiers import TierKind, TierSpec, groups_for_nm, groups_for_sparsity  # noqa: F401 - the format's tiers

FORMAT_NAME = "sparsedial-elastic"
FORMAT_VERSION = 1
NEVER_DROPPED = 255
SPEC_HASH = "spec_sha256"
INTEGRITY_FIELDS = ("files", SPEC_HASH)
REQUIRED_FILES = ("config.json", "elastic.safetensors")  # plus the base weights
_SHA256_HEX = frozenset("0123456789abcdef")
LINEAR_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LoraMode = Literal["masked", "unmasked"]


def keep_count(in_features: int, sparsity: float) -> int:
    """Weights kept per row at `sparsity`: max(1, int(in * (1 - s))) (the nested-mask rule; the epsilon keeps
    0.7 * 100 from rounding down, docs/architecture.md)."""
    return max(1, int(in_features * (1.0 - sparsity) + 1e-9))


@dataclass(frozen=True)
class LoraGroup:
    """LoRA group g covers sparsities in (low, high]; `nm` marks the 2:4 tier's own group."""

    index: int
    low: float
    high: float
    rank: int
    nm: bool = False


@dataclass
class ElasticSpec:
    """Everything in elastic.json except the file hashes."""

    tiers: list[TierSpec]
    groups: list[LoraGroup]
    linears: list[str]  # full names, e.g. model.layers.0.self_attn.q_proj
    lora_mode: LoraMode = "masked"
    lora_scale: float = 1.0
    lora0_off_below: float = 0.4
    importance: str = "wanda"
    method: str = "epts"
    base_model: str = ""
    base_weights: str = "model.safetensors"
    """Dense weights, relative to the checkpoint folder; may point at the base model's own file
    (e.g. ../stdlib-tiny/model.safetensors) so the base is not stored twice. Its sha256 is checked."""
    calibration: dict = field(default_factory=dict)
    compress_config: dict = field(default_factory=dict)
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION

    def tier(self, name: str) -> TierSpec:
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(f"unknown tier {name!r}; tiers: {', '.join(t.name for t in self.tiers)}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict, n_layers: int | None = None) -> ElasticSpec:
        """Validate against the schema (elastic_schema; raises SpecError naming the JSON path) and build.
        `n_layers` (the model's decoder block count) also checks schedule lengths. The integrity fields are
        read_elastic's business and are ignored here."""
        doc = validate_spec({k: v for k, v in d.items() if k not in INTEGRITY_FIELDS}, n_layers)
        tiers = [TierSpec(t.name, t.kind, t.sparsity, tuple(t.lora_groups), t.n, t.m,
                          tuple(t.schedule) if t.schedule else None) for t in doc.tiers]
        groups = [LoraGroup(g.index, g.low, g.high, g.rank, g.nm) for g in doc.groups]
        return cls(tiers=tiers, groups=groups, **doc.model_dump(exclude={"tiers", "groups"}))


# ------------------------------------------------------------------------------------------- mask math
def drop_levels_from_rank(rank: torch.Tensor) -> torch.Tensor:
    """rank [out, in] (0 = most important in its row) -> uint8 drop levels (see module doc)."""
    in_features = rank.shape[1]
    keeps = torch.tensor([keep_count(in_features, p / 100) for p in range(1, 101)])  # [100], non-increasing
    # first percent p with keep(p) <= r: count of percents whose keep is still > r, plus one
    level = (keeps[None, None, :] > rank[..., None].cpu()).sum(-1) + 1  # [out, in] in 1..101
    level = torch.where(level > 100, torch.full_like(level, NEVER_DROPPED), level)
    return level.to(torch.uint8).to(rank.device)


def rank_from_scores(scores: torch.Tensor) -> torch.Tensor:
    """Per-row rank of each weight by descending score (ties broken by column index): [out, in] int64."""
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return rank


def unstructured_mask(drop_level: torch.Tensor, percent: int) -> torch.Tensor:
    """Keep mask (bool [out, in]) at an integer sparsity percent."""
    return drop_level.to(torch.int16) > percent


def pack_mask24(mask: torch.Tensor) -> torch.Tensor:
    """bool [out, in] (in % 4 == 0) -> uint8 [out, in/4], bit j = input 4g+j kept."""
    out, in_features = mask.shape
    bits = mask.view(out, in_features // 4, 4).to(torch.uint8)
    return (bits * torch.tensor([1, 2, 4, 8], dtype=torch.uint8, device=mask.device)).sum(-1).to(torch.uint8)


def unpack_mask24(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in/4] -> bool [out, in]."""
    bits = (packed[..., None] >> torch.arange(4, dtype=torch.uint8, device=packed.device)) & 1
    return bits.bool().reshape(packed.shape[0], -1)


# ------------------------------------------------------------------------------------------- file I/O
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_elastic(out_dir: Path, spec: ElasticSpec, tensors: dict[str, torch.Tensor]) -> None:
    """Write elastic.safetensors and elastic.json (base files must already be in `out_dir`, or
    `spec.base_weights` must point at them)."""
    out_dir = Path(out_dir)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out_dir / "elastic.safetensors",
              metadata={"format": FORMAT_NAME})
    hashed = sorted(p.name for p in out_dir.iterdir()
                    if p.is_file() and p.name != "elastic.json" and not p.name.endswith(".md"))
    if spec.base_weights not in hashed:
        if not (out_dir / spec.base_weights).is_file():
            raise FileNotFoundError(f"base weights {out_dir / spec.base_weights} not found")
        hashed.append(spec.base_weights)
    doc = spec.to_json()
    doc["files"] = {name: _sha256(out_dir / name) for name in hashed}
    write_elastic_json(out_dir, doc)


def canonical_json(doc: dict) -> str:
    """The text `spec_sha256` hashes: the document less that field, keys sorted, no whitespace."""
    return json.dumps({k: v for k, v in doc.items() if k != SPEC_HASH}, sort_keys=True, separators=(",", ":"))


def spec_digest(doc: dict) -> str:
    return hashlib.sha256(canonical_json(doc).encode()).hexdigest()


def write_elastic_json(out_dir: Path, doc: dict) -> None:
    """Write `doc` as `out_dir`/elastic.json, sealed with a fresh `spec_sha256`. write_elastic ends here;
    call it directly to re-seal metadata changed on purpose (a moved checkpoint, or one written before the
    seal existed): `write_elastic_json(d, json.loads((d / "elastic.json").read_text()))`."""
    doc = json.loads(json.dumps(doc))  # as a reader will see it (tuples -> lists, int keys -> str)
    doc[SPEC_HASH] = spec_digest(doc)
    (Path(out_dir) / "elastic.json").write_text(json.dumps(doc, indent=2))


def is_elastic(model_dir: Path) -> bool:
    return (Path(model_dir) / "elastic.json").is_file()


def read_elastic(model_dir: Path, verify_hashes: bool = True, *,
                 allow_external_base: bool = False) -> tuple[ElasticSpec, dict[str, torch.Tensor]]:
    """Read and validate elastic.json + elastic.safetensors; raise ModelLoadError naming the first problem.

    Checks, in order: format and version; the seal (`spec_sha256`); the schema; the integrity data
    (`files` present, covering what is loaded, every name inside the checkpoint, the base weights inside it
    or its parent folder unless `allow_external_base`); the listed files' sha256 (skipped when
    `verify_hashes` is False: that is the costly part, hashing every weight file; the other checks always
    run); every floating-point tensor of elastic.safetensors finite."""
    model_dir = Path(model_dir)
    meta_path = model_dir / "elastic.json"
    doc = _read_doc(meta_path)
    _check_seal(doc, meta_path)
    try:
        spec = ElasticSpec.from_json(doc, n_layers=_num_layers(model_dir))
    except SpecError as e:
        raise ModelLoadError(f"{meta_path}: {e}") from None
    files = _listed_files(doc, meta_path)
    _check_file_names(model_dir, spec, files, allow_external_base)
    if verify_hashes:
        for name, digest in files.items():
            path = model_dir / name
            if not path.is_file():
                raise ModelLoadError(f"{path}: listed in elastic.json but missing")
            if _sha256(path) != digest:
                raise ModelLoadError(f"{path}: sha256 does not match elastic.json (file changed or corrupt)")
    return spec, _read_tensors(model_dir / "elastic.safetensors")


def base_weights_name(model_dir: Path) -> object:
    """elastic.json's `base_weights` (read by `_read_doc`, the one reader of elastic.json, so the format and
    version are checked here too); the loader needs it before the rest of the checkpoint is read."""
    return _read_doc(Path(model_dir) / "elastic.json").get("base_weights", "model.safetensors")


def _read_doc(meta_path: Path) -> dict:
    if not meta_path.is_file():
        raise ModelLoadError(f"{meta_path.parent}: not an elastic checkpoint (no elastic.json)")
    try:
        doc = json.loads(meta_path.read_text())
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8; absurd nesting
        raise ModelLoadError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ModelLoadError(f"{meta_path}: expected a JSON object, found {type(doc).__name__}")
    if doc.get("format") != FORMAT_NAME:
        raise ModelLoadError(f"{meta_path}: format is {doc.get('format')!r}, expected {FORMAT_NAME!r}")
    if doc.get("version") != FORMAT_VERSION:
        raise ModelLoadError(f"{meta_path}: format version {doc.get('version')!r} is not supported "
                             f"(this sparsedial reads version {FORMAT_VERSION})")
    return doc


def _check_seal(doc: dict, meta_path: Path) -> None:
    stored = doc.get(SPEC_HASH)
    if stored is None:
        raise ModelLoadError(f"{meta_path}: {SPEC_HASH}: missing, so edits cannot be detected (written before "
                             f"sparsedial sealed elastic.json? re-seal it with elastic_format.write_elastic_json)")
    actual = spec_digest(doc)
    if stored != actual:
        raise ModelLoadError(f"{meta_path}: {SPEC_HASH}: expected {actual}, found {found_text(stored)}: "
                             f"elastic.json was edited after it was written")


def _listed_files(doc: dict, meta_path: Path) -> dict[str, str]:
    files = doc.get("files")
    if not files:  # missing, null or empty: nothing would be verified
        raise ModelLoadError(f"{meta_path}: files: missing or empty, so the checkpoint has no integrity data "
                             f"(expected a sha256 per file)")
    if not isinstance(files, dict):
        raise ModelLoadError(f"{meta_path}: files: expected an object of name -> sha256, found "
                             f"{type(files).__name__}")
    for name, digest in files.items():
        if not (isinstance(digest, str) and len(digest) == 64 and set(digest) <= _SHA256_HEX):
            raise ModelLoadError(f"{meta_path}: files[{name!r}]: expected a sha256 hex digest (64 characters "
                                 f"0-9a-f), found {found_text(digest)}")
    return files


def _check_file_names(model_dir: Path, spec: ElasticSpec, files: dict[str, str],
                      allow_external_base: bool) -> None:
    """Listed names stay inside the checkpoint (the base weights: see resolve_base_weights), and the files
    that are loaded are listed."""
    meta_path = model_dir / "elastic.json"
    resolve_base_weights(model_dir, spec.base_weights, allow_external_base)
    home = model_dir.resolve()
    for name in files:
        if name == spec.base_weights:
            continue
        real = _resolve(model_dir / name, f"{meta_path}: files[{name!r}]")
        if not real.is_relative_to(home):
            raise ModelLoadError(f"{meta_path}: files[{name!r}]: expected a file inside the checkpoint folder "
                                 f"{model_dir}, found {real} (outside the checkpoint folder)")
    # the loader prefers a local model.safetensors over base_weights (loader.base_weights_path)
    base = "model.safetensors" if (model_dir / "model.safetensors").is_file() else spec.base_weights
    for name in (*REQUIRED_FILES, base):
        if name not in files:
            raise ModelLoadError(f"{meta_path}: files: no sha256 for {name!r}, which is loaded (expected "
                                 f"one per file of the checkpoint)")


def resolve_base_weights(model_dir: Path, name: object, allow_external_base: bool = False) -> Path:
    """`model_dir` / `name` (elastic.json's base_weights), which must resolve (symlinks, `..`) inside the
    checkpoint folder or under its parent folder, unless `allow_external_base`: a checkpoint from elsewhere
    must not make sparsedial read (and report on) arbitrary files."""
    meta_path = Path(model_dir) / "elastic.json"
    if not isinstance(name, str) or not name:
        raise ModelLoadError(f"{meta_path}: base_weights: expected a file name, found {found_text(name)}")
    path = Path(model_dir) / name
    if allow_external_base:
        return path
    allowed = Path(model_dir).resolve().parent
    real = _resolve(path, f"{meta_path}: base_weights")
    if not real.is_relative_to(allowed):
        raise ModelLoadError(f"{meta_path}: base_weights: expected a file inside {allowed} (the checkpoint "
                             f"folder's parent), found {name!r} -> {real}; pass allow_external_base=True to "
                             f"load it")
    return path


def _resolve(path: Path, where: str) -> Path:
    """path.resolve(), whose errors on hostile names (a NUL byte, a symlink loop) become ModelLoadError."""
    try:
        return path.resolve()
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"{where}: expected a file name, found {found_text(str(path))} ({e})") from None


def _num_layers(model_dir: Path) -> int:
    """num_hidden_layers of the checkpoint's config.json (schedules have one entry per decoder block)."""
    path = model_dir / "config.json"
    try:
        n = json.loads(path.read_text()).get("num_hidden_layers")
    except (OSError, ValueError, AttributeError) as e:
        raise ModelLoadError(f"{path}: missing or not a JSON object ({e})") from None
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ModelLoadError(f"{path}: num_hidden_layers: expected a positive integer, found {found_text(n)}")
    return n


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"{path}: corrupt or unreadable safetensors file ({e})") from None
    for key, t in tensors.items():
        check_finite(t, key, path)
    return tensors


def check_finite(t: torch.Tensor, key: str, path: Path) -> None:
    """NaN/inf weights load fine and poison every logit later: refuse them here, naming the tensor."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ModelLoadError(f"{path}: tensor {key!r}: expected finite values, found {bad} NaN/inf "
                             f"of {t.numel()}")


def validate_tensors(spec: ElasticSpec, tensors: dict[str, torch.Tensor],
                     shapes: dict[str, tuple[int, int]], where: Path) -> None:
    """Check every linear's maps and LoRA factors against the base weight shapes [out, in]."""
    has_nm = any(t.kind == "nm" for t in spec.tiers)
    for name in spec.linears:
        if name not in shapes:
            raise ModelLoadError(f"{where}: elastic.json names linear {name!r}, which the base model lacks")
        out, in_features = shapes[name]
        expect = {f"{name}.drop_level": ((out, in_features), torch.uint8)}
        if has_nm:
            expect[f"{name}.mask24"] = ((out, in_features // 4), torch.uint8)
        for g in spec.groups:
            expect[f"{name}.lora.{g.index}.A"] = ((g.rank, in_features), None)
            expect[f"{name}.lora.{g.index}.B"] = ((out, g.rank), None)
        for key, (shape, dtype) in expect.items():
            t = tensors.get(key)
            if t is None:
                raise ModelLoadError(f"{where}: tensor {key!r} is missing")
            if tuple(t.shape) != shape or (dtype is not None and t.dtype != dtype):
                raise ModelLoadError(f"{where}: tensor {key!r} is {tuple(t.shape)} {t.dtype}, "
                                     f"expected {shape}{'' if dtype is None else ' ' + str(dtype)}")


# ------------------------------------------------------------------------------------------- tier math
def tier_mask(spec: ElasticSpec, tier: TierSpec, tensors: dict[str, torch.Tensor], name: str,
              layer: int) -> torch.Tensor | None:
    """Keep mask of linear `name` (in decoder block `layer`) at `tier`; None for dense."""
    if tier.kind == "dense":
        return None
    if tier.kind == "nm":
        return unpack_mask24(tensors[f"{name}.mask24"])
    return unstructured_mask(tensors[f"{name}.drop_level"], tier.block_percent(layer))


def active_lora_groups(spec: ElasticSpec, tier: TierSpec, tensors: dict[str, torch.Tensor],
                       name: str, layer: int) -> list[int]:
    """The LoRA groups of linear `name` in block `layer` at `tier`: the tier's own list, or, under a per-block
    schedule (OWL), the groups of that block's sparsity; less group 0 where the block disabled it."""
    sparsity = tier.sparsity
    groups = list(tier.lora_groups)
    if tier.schedule is not None and tier.kind == "unstructured":
        sparsity = tier.block_percent(layer) / 100
        groups = list(groups_for_sparsity(spec.groups, sparsity))
    off = tensors.get(f"{name}.lora0_off")
    if 0 in groups and off is not None and int(off) and sparsity <= spec.lora0_off_below:
        groups.remove(0)
    return groups


def tier_delta(spec: ElasticSpec, tier: TierSpec, tensors: dict[str, torch.Tensor], name: str,
               layer: int) -> torch.Tensor | None:
    """sum_{g in active groups} scale * B_g A_g (fp32 [out, in]); None when no group applies."""
    delta = None
    for g in active_lora_groups(spec, tier, tensors, name, layer):
        a, b = tensors[f"{name}.lora.{g}.A"].float(), tensors[f"{name}.lora.{g}.B"].float()
        delta = b @ a if delta is None else delta + b @ a
    return None if delta is None else delta * spec.lora_scale


def merged_weight(spec: ElasticSpec, tier: TierSpec, tensors: dict[str, torch.Tensor], name: str,
                  layer: int, weight: torch.Tensor, *, masked: bool = True) -> torch.Tensor:
    """The statically merged weight of a tier (masked mode): (W + delta) * M, in W's dtype. `masked=False`:
    W + delta only, for a packer that keeps the mask's positions itself (tier_mask gives them)."""
    w = weight.float()  # may be `weight` itself: the first group makes a new tensor, later ones add in place
    if spec.lora_mode == "masked":  # w + scale * sum_g B_g A_g (tier_delta), one fused pass per group
        for i, g in enumerate(active_lora_groups(spec, tier, tensors, name, layer)):
            a, b = tensors[f"{name}.lora.{g}.A"].float(), tensors[f"{name}.lora.{g}.B"].float()
            w = torch.addmm(w, b, a, alpha=spec.lora_scale) if i == 0 else w.addmm_(b, a, alpha=spec.lora_scale)
    mask = tier_mask(spec, tier, tensors, name, layer) if masked else None
    if mask is not None:
        w = w * mask
    return w.to(weight.dtype)
