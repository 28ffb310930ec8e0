"""`sparsedial compress`: one verb per method, from an HF model directory to a checkpoint on disk.

- `epts` (default): nested masks from one dense-trajectory score + EPTS reconstruction -> ONE elastic
  checkpoint serving every tier (`--epochs 0`: nested masks only, no LoRA).
- `wanda`, `sparsegpt`, `magnitude`: the per-tier baselines, each tier pruned separately -> one plain HF
  checkpoint per tier under OUT/<tier> (e.g. OUT/50pct, OUT/2-4).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from sparsedial.engine.elastic_format import LINEAR_NAMES, ElasticSpec
from sparsedial.engine.loader import load_model
from sparsedial.engine.tiers import TierKind, parse_tier_name, slug, tiers_from_names

from .calibration import CalibrationConfig, calibration_tokens
from .epts import EPTSConfig, reconstruct
from .export import copy_base_files, export_elastic, parse_tiers, save_hf_weights, weights_dtype
from .nested import build_nested, dense_input_norms
from .owl import outlier_ratios, owl_schedule
from .pruners import PruneConfig, overall_sparsity, prune


@dataclass
class CompressResult:
    out_dir: Path
    wall_s: float
    tiers: list[str]
    details: dict = field(default_factory=dict)


def tier_slug(tier: str) -> str:
    """OUT/<slug> of a baseline tier: "50%" -> "50pct", "2:4" -> "2-4" (engine/tiers.py)."""
    return slug(tier)


def compress_epts(model_dir: Path, out_dir: Path, tiers: list[str], calib: CalibrationConfig, cfg: EPTSConfig,
                  device: str = "cpu", chain: bool = False, link_base: bool = False,
                  importance: str = "wanda", progress: bool = True,
                  calib_tokens: torch.Tensor | None = None, owl_lambda: float = 0.0) -> CompressResult:
    """Nested masks + EPTS -> one elastic checkpoint. `calib_tokens` overrides sampling from `calib.source`;
    `owl_lambda` > 0 stores OWL per-block schedules for the unstructured tiers."""
    t0 = time.perf_counter()
    tiers_from_names(tiers)  # a bad tier name fails now, not after the reconstruction
    lm = load_model(model_dir, dtype="float32", device=device)
    tokens = (calib_tokens if calib_tokens is not None else calibration_tokens(lm.tokenizer, calib)).to(device)
    norms = dense_input_norms(lm.model, tokens, progress=progress) if importance == "wanda" else None
    masks = build_nested(lm.model, norms, importance=importance, chain=chain)
    train = cfg.epochs > 0
    lora = reconstruct(lm.model, masks, tokens, cfg, work_dir=out_dir / ".epts-resume", progress=progress) \
        if train else {}
    groups = cfg.lora_groups() if train else []
    n_layers = lm.config.num_hidden_layers
    tier_specs = parse_tiers(tiers, groups)
    if owl_lambda:
        if norms is None:
            raise ValueError("OWL schedules need Wanda importance (dense-trajectory input norms)")
        ratios = outlier_ratios(lm.model, norms)
        tier_specs = [dataclasses.replace(t, schedule=owl_schedule(ratios, t.sparsity, owl_lambda))
                      if t.kind == "unstructured" else t for t in tier_specs]
    spec = ElasticSpec(
        tiers=tier_specs,
        groups=groups,
        linears=[f"model.layers.{i}.{n}" for i in range(n_layers) for n in LINEAR_NAMES],
        lora_mode=cfg.lora_mode,
        lora0_off_below=cfg.lora0_off_below,
        importance=importance,
        method="epts" if train else f"nested-{importance}",
        base_model=Path(model_dir).name,
        calibration=asdict(calib),
        compress_config={**asdict(cfg), "chain": chain, "owl_lambda": owl_lambda},
    )
    base_dtype = weights_dtype(Path(model_dir) / "model.safetensors")
    export_elastic(Path(model_dir), out_dir, spec, masks, lora, lora_dtype=base_dtype, link_base=link_base)
    wall = time.perf_counter() - t0
    _cleanup_resume(out_dir)
    return CompressResult(out_dir, wall, [t.name for t in spec.tiers])


def compress_baseline(model_dir: Path, out_dir: Path, method: str, tiers: list[str], calib: CalibrationConfig,
                      device: str = "cpu", progress: bool = True) -> CompressResult:
    """Each tier pruned separately from the dense model; one HF checkpoint per tier."""
    t0 = time.perf_counter()
    details = {}
    base_dtype = weights_dtype(Path(model_dir) / "model.safetensors")
    tokens = None
    specs = [parse_tier_name(t) for t in tiers]  # every name checked before the first tier is pruned
    for spec in specs:
        tier = spec.name
        if spec.kind is TierKind.DENSE:
            continue
        lm = load_model(model_dir, dtype="float32", device=device)  # every tier starts from the dense model
        if tokens is None and method != "magnitude":  # the same calibration set for every tier
            tokens = calibration_tokens(lm.tokenizer, calib).to(device)
        pcfg = PruneConfig(method=method, nm=(spec.n, spec.m)) if spec.kind is TierKind.NM else \
            PruneConfig(method=method, sparsity=spec.sparsity)
        t1 = time.perf_counter()
        prune(lm.model, pcfg, tokens, progress=progress)
        dest = out_dir / tier_slug(tier)
        copy_base_files(Path(model_dir), dest, link_base=True)
        save_hf_weights(lm.model, dest, base_dtype)
        details[tier] = {"wall_s": time.perf_counter() - t1, "sparsity": overall_sparsity(lm.model),
                         "config": pcfg.to_json()}
    (out_dir / "baseline.json").write_text(json.dumps({"method": method, "calibration": asdict(calib),
                                                       "tiers": details}, indent=2))
    return CompressResult(out_dir, time.perf_counter() - t0, [t.name for t in specs if t.kind is not TierKind.DENSE],
                          details)


def _cleanup_resume(out_dir: Path) -> None:
    import shutil

    shutil.rmtree(out_dir / ".epts-resume", ignore_errors=True)
