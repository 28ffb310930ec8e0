"""Load a Hugging Face model directory into sparsedial's decoder.

The model is built on the meta device (no memory, no init cost), every tensor is read from safetensors
(single file or sharded with an index), checked against the expected name and shape, converted to the
requested dtype and assigned. Problems raise `ModelLoadError` naming the file and tensor; that includes a
NaN/inf value in a floating-point weight (checked once per tensor at load: cheap next to reading it, and
otherwise it surfaces as garbage or a crash during generation).

An elastic checkpoint may keep its base weights elsewhere (elastic.json's `base_weights`): they must lie in
its folder or under its parent folder unless the caller passes `allow_external_base=True`
(elastic_format.resolve_base_weights).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from sparsedial.errors import ModelLoadError

from .config import ModelConfig
from .elastic_format import base_weights_name, check_finite, is_elastic, resolve_base_weights
from .model import Transformer
from .options import DType, parse

# Tensors some checkpoints carry that the runtime recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class LoadedModel:
    """A ready model with its tokenizer and where it came from."""

    model: Transformer
    tokenizer: object  # transformers.PreTrainedTokenizerBase
    config: ModelConfig
    path: Path
    hf_config: dict


def resolve_dtype(dtype: DType | torch.dtype, device: torch.device) -> torch.dtype:
    """`auto`: fp32 on CPU (reduced-precision matmuls are slow there), bf16 on CUDA when supported, else fp16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    dtype = parse(DType, dtype, "dtype")
    if dtype is DType.AUTO:
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {DType.FLOAT32: torch.float32, DType.FLOAT16: torch.float16, DType.BFLOAT16: torch.bfloat16}[dtype]


def read_config(model_dir: Path) -> tuple[dict, ModelConfig]:
    path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise ModelLoadError(f"model directory not found: {model_dir}")
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing (a Hugging Face model directory needs config.json)")
    try:
        hf = json.loads(path.read_text())
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8; absurd nesting
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, found {type(hf).__name__}")
    return hf, ModelConfig.from_hf(hf)


def weight_files(model_dir: Path, allow_external_base: bool = False) -> dict[str, Path]:
    """Map each tensor name to its safetensors file (single file, or the shards an index names)."""
    index = model_dir / "model.safetensors.index.json"
    single = base_weights_path(model_dir, allow_external_base=allow_external_base)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"{index}: not a valid safetensors index ({e})") from None
        files = {name: model_dir / fname for name, fname in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise ModelLoadError(f"{index} names shard {f.name}, which is missing")
        return files
    if single.is_file():
        return {name: single for name in _tensor_names(single)}
    if list(model_dir.glob("*.bin")):
        raise ModelLoadError(f"{model_dir}: only pickle .bin weights found; sparsedial loads safetensors only")
    raise ModelLoadError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


def base_weights_path(model_dir: Path, allow_external_base: bool = False) -> Path:
    """`model.safetensors`, unless an elastic checkpoint's elastic.json points at its base weights elsewhere
    (inside its parent folder, or anywhere with `allow_external_base`)."""
    model_dir = Path(model_dir)
    if is_elastic(model_dir) and not (model_dir / "model.safetensors").is_file():
        return resolve_base_weights(model_dir, base_weights_name(model_dir), allow_external_base)
    return model_dir / "model.safetensors"


def _tensor_names(path: Path) -> list[str]:
    try:
        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: corrupt or unreadable safetensors file ({e})") from None


def load_state_dict(model_dir: Path, expected: dict[str, torch.Size], dtype: torch.dtype,
                    device: torch.device, allow_external_base: bool = False) -> dict[str, torch.Tensor]:
    """Read every expected tensor, checking presence, shape and finite values; unknown tensors are an error
    too."""
    files = weight_files(model_dir, allow_external_base=allow_external_base)
    unknown = sorted(n for n in files if n not in expected and not n.endswith(_IGNORED_SUFFIXES))
    if unknown:
        raise ModelLoadError(f"{files[unknown[0]]}: unexpected tensor {unknown[0]!r} "
                             f"({len(unknown)} unexpected in all); is config.json from the same model?")
    missing = [n for n in expected if n not in files]
    if missing:
        raise ModelLoadError(f"{model_dir}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)
    for path, names in by_file.items():
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in names:
                    t = f.get_tensor(name)
                    if t.shape != expected[name]:
                        raise ModelLoadError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, "
                                             f"expected {tuple(expected[name])}")
                    check_finite(t, name, path)  # in the file's dtype: a later cast's overflow is not the file's
                    state[name] = t.to(device=device, dtype=dtype)
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"{path}: corrupt or unreadable safetensors file ({e})") from None
    return state


def load_model(model_dir: str | Path, dtype: DType | torch.dtype = "auto", device: str | torch.device = "cpu",
               with_tokenizer: bool = True, allow_external_base: bool = False) -> LoadedModel:
    """Load `model_dir` (HF layout) into a `Transformer` on `device`, in eval mode. `allow_external_base`:
    an elastic checkpoint's base weights may lie outside its parent folder (see the module docstring)."""
    model_dir = Path(model_dir)
    device = torch.device(device)
    hf, cfg = read_config(model_dir)
    torch_dtype = resolve_dtype(dtype, device)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {n: p.shape for n, p in model.named_parameters()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    state = load_state_dict(model_dir, expected, torch_dtype, device, allow_external_base=allow_external_base)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:  # cannot happen when `expected` is complete; guards future module changes
        raise ModelLoadError(f"{model_dir}: parameter {meta[0]!r} was not loaded")
    model.init_rope()
    model.eval()
    tokenizer = load_tokenizer(model_dir) if with_tokenizer else None
    return LoadedModel(model=model, tokenizer=tokenizer, config=cfg, path=model_dir, hf_config=hf)


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ModelLoadError(f"{model_dir}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json)")
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{model_dir}: tokenizer cannot be loaded ({e})") from None
