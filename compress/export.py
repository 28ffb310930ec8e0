"""Write elastic checkpoints, materialize one tier in a loaded model, and export a tier as a plain HF model."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from sparsedial.engine.elastic_format import (
    LINEAR_NAMES,
    ElasticSpec,
    LoraGroup,
    merged_weight,
    read_elastic,
    tier_delta,
    validate_tensors,
    write_elastic,
    write_elastic_json,
)
from sparsedial.engine.loader import LoadedModel, load_model
from sparsedial.engine.model import Transformer
from sparsedial.engine.tiers import TierSpec, tiers_from_names

from .nested import NestedMasks
from .pruners import overall_sparsity

BASE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")
DEFAULT_TIERS = ("dense", "30%", "40%", "50%", "60%", "70%", "80%", "90%", "2:4")


def parse_tiers(names: list[str] | tuple[str, ...], groups: list[LoraGroup]) -> list[TierSpec]:
    """The tiers a checkpoint lists: engine/tiers.py's `tiers_from_names` (strict whole percents; dense always
    first, since the base weights are always there); ValueError naming a bad tier."""
    return tiers_from_names(names, groups)


def copy_base_files(base_dir: Path, out_dir: Path, link_base: bool) -> str:
    """Copy config/tokenizer files; copy the weights too, or (link_base) refer to them by relative path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in BASE_FILES:
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, out_dir / name)
    weights = base_dir / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: elastic export needs a single-file base model.safetensors")
    if link_base:
        return os.path.relpath(weights.resolve(), out_dir.resolve())
    shutil.copy2(weights, out_dir / "model.safetensors")
    return "model.safetensors"


def export_elastic(base_dir: Path, out_dir: Path, spec: ElasticSpec, masks: NestedMasks,
                   lora: dict[str, torch.Tensor], lora_dtype: torch.dtype, link_base: bool = False) -> None:
    spec.base_weights = copy_base_files(base_dir, out_dir, link_base)
    tensors: dict[str, torch.Tensor] = {}
    for name in spec.linears:
        tensors[f"{name}.drop_level"] = masks.drop_level[name].cpu()
        if name in masks.mask24:
            tensors[f"{name}.mask24"] = masks.mask24[name].cpu()
    for k, v in lora.items():
        tensors[k] = v if k.endswith("lora0_off") else v.to(lora_dtype)
    write_elastic(out_dir, spec, tensors)


@contextmanager
def tier_weights(model: Transformer, spec: ElasticSpec, tensors: dict[str, torch.Tensor],
                 tier: TierSpec) -> Iterator[Transformer]:
    """Temporarily replace every block linear's weight by the tier's merged weight (masked LoRA mode), or by
    the sparse base plus the dense low-rank delta (unmasked mode: same output as the run-time low-rank path)."""
    saved = {}
    try:
        for i, layer in enumerate(model.model.layers):
            for short in LINEAR_NAMES:
                lin = layer.get_submodule(short)
                name = f"model.layers.{i}.{short}"
                saved[name] = lin.weight.data
                w = merged_weight(spec, tier, tensors, name, i, lin.weight.data)
                if spec.lora_mode == "unmasked":
                    delta = tier_delta(spec, tier, tensors, name, i)
                    if delta is not None:
                        w = (w.float() + delta.to(w.device)).to(w.dtype)
                lin.weight.data = w
        yield model
    finally:
        for i, layer in enumerate(model.model.layers):
            for short in LINEAR_NAMES:
                name = f"model.layers.{i}.{short}"
                if name in saved:
                    layer.get_submodule(short).weight.data = saved[name]


def load_elastic_for_eval(model_dir: Path, dtype="float32", device="cpu", loaded: LoadedModel | None = None,
                          allow_external_base: bool = False) -> tuple[LoadedModel, ElasticSpec, dict[str, torch.Tensor]]:
    """The base model (`loaded`, or loaded here) plus the validated elastic state (evaluation, export)."""
    lm = loaded or load_model(model_dir, dtype=dtype, device=device, allow_external_base=allow_external_base)
    spec, tensors = read_elastic(model_dir, allow_external_base=allow_external_base)
    shapes = {n: tuple(p.shape) for n, p in lm.model.named_parameters() if n.endswith(".weight")}
    validate_tensors(spec, tensors, {n[: -len(".weight")]: s for n, s in shapes.items()}, model_dir)
    tensors = {k: v.to(device) for k, v in tensors.items()}
    return lm, spec, tensors


def export_tier_hf(model_dir: Path, tier_name: str, out_dir: Path) -> float:
    """Write one tier as a plain HF checkpoint (merged weights with exact zeros); returns its sparsity."""
    lm, spec, tensors = load_elastic_for_eval(model_dir, dtype="float32")
    tier = spec.tier(tier_name)
    copy_base_files(model_dir, out_dir, link_base=True)  # config + tokenizer only; weights written below
    src_dtype = weights_dtype(model_dir / spec.base_weights)
    with tier_weights(lm.model, spec, tensors, tier) as model:
        save_hf_weights(model, out_dir, src_dtype)
        return overall_sparsity(model)


def save_hf_weights(model: Transformer, out_dir: Path, dtype: torch.dtype) -> None:
    """The model's weights as HF `model.safetensors` in `dtype` (a tied lm_head is not stored twice)."""
    tied = model.config.tie_word_embeddings
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()
             if not (tied and k == "lm_head.weight")}
    save_file(state, out_dir / "model.safetensors", metadata={"format": "pt"})


def weights_dtype(path: Path) -> torch.dtype:
    """The dtype a safetensors file stores (of its first tensor): exports keep the base model's dtype."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.get_tensor(next(iter(f.keys()))).dtype


def move_elastic(src: Path, dst: Path) -> None:
    """Copy an elastic checkpoint to `dst`, re-pointing a by-reference base (`base_weights`) from there."""
    import json

    doc = json.loads((src / "elastic.json").read_text())
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.is_file() and p.name != "elastic.json":
            shutil.copy2(p, dst / p.name)
    old = doc["base_weights"]
    if not (src / old).resolve().parent == src.resolve():  # by reference: rewrite the relative path
        new = os.path.relpath((src / old).resolve(), dst.resolve())
        doc["files"][new] = doc["files"].pop(old)
        doc["base_weights"] = new
    write_elastic_json(dst, doc)  # re-sealed: the moved base path is a deliberate edit
