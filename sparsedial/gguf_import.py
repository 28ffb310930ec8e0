"""Turn a llama.cpp GGUF file (Llama family) into a Hugging Face model directory the runtime loads.

`import_gguf(file, out)` writes `config.json` (LlamaForCausalLM), `generation_config.json`, `tokenizer.json` +
`tokenizer_config.json` (sparsedial.gguf_tokenizer) and `model.safetensors` (sharded past `shard_bytes`, with an
index), all built from the file with the `gguf` package (gguf-py): metadata through `GGUFReader`, every tensor
dequantized by `gguf.quants.dequantize` to float32, then cast to the dtype asked for.

Layout differences undone on the way:
- names: `token_embd`, `blk.N.attn_q`, ..., `output` -> `model.embed_tokens`, `model.layers.N.self_attn.q_proj`,
  ..., `lm_head` (no `output.weight`: tied embeddings);
- shapes: GGUF lists dimensions innermost first (ne0 = row length); the reader hands them back outermost first,
  which is already PyTorch's [out_features, in_features];
- rotary layout: llama.cpp's converter reorders the rows of attn_q/attn_k inside each head so that the two
  members of a rotary pair are adjacent (row 2i+j of a head holds HF row j*(head_dim/2)+i, as llama.cpp rotates
  interleaved pairs and HF rotates the two halves); `unpermute_rows` puts them back;
- Llama 3.1-style RoPE scaling is stored as a `rope_freqs.weight` tensor of per-frequency divisors; it is
  turned back into `rope_scaling` (rope_type llama3) after checking that it matches.

Everything is written into a temporary folder next to `out` and renamed into place at the end, so an
interrupted import leaves no half-written model directory; rerunning redoes it from the start.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sparsedial.errors import ModelLoadError, SparsedialError, UnsupportedModelError

from sparsedial.gguf_tokenizer import build_tokenizer, check_tokenizer_kind, dumps

SUPPORTED_ARCHITECTURES = ("llama",)
# The types every test covers, plus the other classic llama.cpp block formats gguf-py dequantizes.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
DTYPES = ("bfloat16", "float16", "float32")
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
ROPE_FREQS = "rope_freqs.weight"
SHARD_BYTES = 4 << 30


@dataclass
class GGUFImport:
    """What `import_gguf` wrote."""

    out: Path
    config: dict[str, Any]
    tensors: int
    shards: int
    notes: list[str] = field(default_factory=list)


def read_gguf(path: Path):
    from gguf import GGUFReader

    if not path.is_file():
        raise ModelLoadError(f"{path}: no such GGUF file")
    try:
        return GGUFReader(path, "r")
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise ModelLoadError(f"{path}: not a readable GGUF file ({e})") from None


def metadata(reader) -> dict[str, Any]:
    """Every key-value field, decoded (strings, numbers, lists)."""
    out = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            out[key] = f.contents()
        except (ValueError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"GGUF metadata {key!r} cannot be decoded ({e})") from None
    return out


def hf_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None for a name not in the map."""
    stem, _, suffix = gguf_name.rpartition(".")
    if suffix != "weight":
        return None
    if stem in _GLOBAL:
        return f"{_GLOBAL[stem]}.weight"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER:
        return f"model.layers.{int(parts[1])}.{_LAYER[parts[2]]}.weight"
    return None


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order: per head, rows (i, j) for pair i and member j -> rows (j, i)."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _int(meta: dict, key: str, default: int | None = None) -> int:
    v = meta.get(key, default)
    if v is None:
        raise ModelLoadError(f"GGUF metadata {key!r} is missing")
    if isinstance(v, list):
        if len(set(v)) != 1:
            raise UnsupportedModelError(f"GGUF metadata {key!r} varies per layer ({v[:4]}...); not supported")
        v = v[0]
    return int(v)


def _f32(v: float) -> float:
    """A float32 metadata value as the shortest decimal that round-trips (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(v)))


def hf_config(meta: dict, shapes: dict[str, tuple[int, ...]], rope_freqs: np.ndarray | None) -> dict[str, Any]:
    """LlamaForCausalLM `config.json` from the `llama.*` metadata (and tensor shapes where metadata is silent)."""
    a = meta["general.architecture"]
    if meta.get(f"{a}.expert_count"):
        raise UnsupportedModelError(f"GGUF {a} with {a}.expert_count={meta[f'{a}.expert_count']} "
                                    f"(mixture of experts) is not supported")
    hidden = _int(meta, f"{a}.embedding_length")
    heads = _int(meta, f"{a}.attention.head_count")
    kv_heads = _int(meta, f"{a}.attention.head_count_kv", heads)
    head_dim = _int(meta, f"{a}.attention.key_length", hidden // heads)
    if _int(meta, f"{a}.attention.value_length", head_dim) != head_dim:
        raise UnsupportedModelError(f"GGUF {a}.attention.value_length differs from key_length ({head_dim})")
    if _int(meta, f"{a}.rope.dimension_count", head_dim) != head_dim:
        raise UnsupportedModelError(f"GGUF {a}.rope.dimension_count={meta[f'{a}.rope.dimension_count']} "
                                    f"(partial rotary) is not supported; head_dim is {head_dim}")
    vocab = shapes["model.embed_tokens.weight"][0]
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": _int(meta, f"{a}.feed_forward_length"),
        "num_hidden_layers": _int(meta, f"{a}.block_count"),
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32(meta.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _f32(meta.get(f"{a}.rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(meta, a, head_dim, rope_freqs),
        "max_position_embeddings": _int(meta, f"{a}.context_length", 2048),
        "vocab_size": vocab,
        "tie_word_embeddings": "lm_head.weight" not in shapes,
        "attention_bias": False, "mlp_bias": False,
        "torch_dtype": "float32",
    }
    for key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("padding_token_id", "pad_token_id")):
        if isinstance(meta.get(f"tokenizer.ggml.{key}"), int):
            cfg[name] = meta[f"tokenizer.ggml.{key}"]
    return cfg


def _rope_scaling(meta: dict, a: str, head_dim: int, rope_freqs: np.ndarray | None) -> dict | None:
    kind = meta.get(f"{a}.rope.scaling.type", "none")
    if rope_freqs is not None:
        if kind not in ("none", ""):
            raise UnsupportedModelError(f"GGUF with both {ROPE_FREQS} and rope scaling {kind!r} is not supported")
        return _llama3_scaling(rope_freqs, meta.get(f"{a}.rope.freq_base", 10000.0), head_dim)
    if kind in ("none", ""):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _f32(meta[f"{a}.rope.scaling.factor"])}
    raise UnsupportedModelError(f"GGUF rope scaling {kind!r} is not supported (none, linear, Llama 3 rope_freqs)")


def _llama3_scaling(divisors: np.ndarray, theta: float, head_dim: int) -> dict:
    """Recover Llama 3.1's rope_scaling from llama.cpp's per-frequency divisors (rope_freqs.weight)."""
    from sparsedial.engine.config import RopeConfig, rope_inv_freq

    divisors = divisors.astype(np.float64).reshape(-1)
    factor = float(divisors.max())
    # Every Llama 3.x release uses these three; the check below refuses a file that does not.
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    rope = RopeConfig(theta=float(theta), type="llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192)
    base = RopeConfig(theta=float(theta))
    implied = (rope_inv_freq(base, head_dim) / rope_inv_freq(rope, head_dim)).double().numpy()
    if divisors.shape != implied.shape or not np.allclose(divisors, implied, rtol=1e-3):
        raise UnsupportedModelError(f"GGUF {ROPE_FREQS} does not match Llama 3 rope scaling "
                                    f"(factor {factor:g}, low/high freq factor 1/4, original context 8192)")
    return scaling


def expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, f, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    out = {"model.embed_tokens.weight": (cfg["vocab_size"], h), "model.norm.weight": (h,)}
    if not cfg["tie_word_embeddings"]:
        out["lm_head.weight"] = (cfg["vocab_size"], h)
    per_layer = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
                 "self_attn.o_proj": (h, q), "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h),
                 "mlp.down_proj": (h, f), "input_layernorm": (h,), "post_attention_layernorm": (h,)}
    for i in range(cfg["num_hidden_layers"]):
        out.update({f"model.layers.{i}.{k}.weight": s for k, s in per_layer.items()})
    return out


def _plan(reader, path: Path) -> tuple[list[tuple[str, Any]], dict[str, tuple[int, ...]], Any]:
    """(hf name, reader tensor) pairs and their shapes; the rope_freqs tensor apart. Refuses unknown names
    and unsupported types before anything is dequantized."""
    plan, shapes, rope = [], {}, None
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in SUPPORTED_TYPES:
            raise UnsupportedModelError(f"{path.name}: tensor {t.name!r} has GGUF type {kind}, which is not "
                                        f"supported (supported: {', '.join(SUPPORTED_TYPES)})")
        if t.name == ROPE_FREQS:
            rope = t
            continue
        name = hf_name(t.name)
        if name is None:
            raise UnsupportedModelError(f"{path.name}: tensor {t.name!r} has no place in a Llama model")
        plan.append((name, t))
        shapes[name] = tuple(int(n) for n in reversed(t.shape.tolist()))
    if "model.embed_tokens.weight" not in shapes:
        raise ModelLoadError(f"{path.name}: no token_embd.weight tensor")
    return plan, shapes, rope


def _dequantize(t) -> np.ndarray:
    from gguf.quants import dequantize

    shape = tuple(int(n) for n in reversed(t.shape.tolist()))
    w = np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
    return w if w.flags.writeable else w.copy()  # F32 comes back as a view of the read-only file map


def import_gguf(gguf_file: str | Path, out: str | Path, dtype: str = "bfloat16", force: bool = False,
                progress: bool = True, shard_bytes: int = SHARD_BYTES) -> GGUFImport:
    """Convert `gguf_file` into the model directory `out` (see the module docstring)."""
    import torch
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    path, out = Path(gguf_file), Path(out)
    if dtype not in DTYPES:
        raise SparsedialError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise SparsedialError(f"--out {out} exists and is not empty; pass --force to replace it")
    reader = read_gguf(path)
    meta = metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(f"{path.name}: GGUF architecture {arch!r} is not supported "
                                    f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    check_tokenizer_kind(meta)
    plan, shapes, rope_t = _plan(reader, path)
    cfg = hf_config(meta, shapes, None if rope_t is None else _dequantize(rope_t))
    want = expected_shapes(cfg)
    for name, shape in shapes.items():
        if name not in want or want[name] != shape:
            raise ModelLoadError(f"{path.name}: tensor {name!r} has shape {shape}, expected "
                                 f"{want.get(name, 'no such tensor for this config')}")
    missing = sorted(set(want) - set(shapes))
    if missing:
        raise ModelLoadError(f"{path.name}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
    tok = build_tokenizer({k: v for k, v in meta.items() if k.startswith("tokenizer.")},
                          model_max_length=cfg["max_position_embeddings"])
    cfg["torch_dtype"] = dtype
    torch_dtype = getattr(torch, dtype)

    tmp = out.parent / f".{out.name}.import-tmp"
    _remove(tmp)  # leftovers of an interrupted run
    tmp.mkdir(parents=True)
    try:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, t in tqdm(plan, desc=f"import {path.name}", unit="tensor", disable=not progress):
            w = _dequantize(t)
            if not np.isfinite(w).all():  # the loader would refuse it; say so now, naming the GGUF tensor
                raise ModelLoadError(f"{path.name}: tensor {t.name!r} has NaN/inf values after dequantization")
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                w = unpermute_rows(w, cfg["num_attention_heads" if "q_proj" in name else "num_key_value_heads"])
            x = torch.from_numpy(w).to(torch_dtype)
            if size and size + x.nbytes > shard_bytes:
                _save_shard(save_file, shards[-1], tmp, len(shards))
                shards.append({})
                size = 0
            shards[-1][name] = x
            size += x.nbytes
        _save_shard(save_file, shards[-1], tmp, len(shards))
        _name_shards(tmp, shards)
        _write_json_files(tmp, cfg, generation_config(meta, cfg), tok)
        _move_into_place(tmp, out)
    except BaseException:
        _remove(tmp)
        raise
    return GGUFImport(out=out, config=cfg, tensors=len(plan), shards=len(shards), notes=tok.notes)


def _save_shard(save_file, tensors: dict, tmp: Path, index: int) -> None:
    save_file(tensors, str(tmp / f"shard-{index}.part"), metadata={"format": "pt"})
    for k in list(tensors):  # keep names, drop data
        tensors[k] = None


def _name_shards(tmp: Path, shards: list[dict]) -> None:
    n = len(shards)
    if n == 1:
        os.replace(tmp / "shard-1.part", tmp / "model.safetensors")
        return
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        os.replace(tmp / f"shard-{i}.part", tmp / fname)
        weight_map.update(dict.fromkeys(names, fname))
    total = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
    (tmp / "model.safetensors.index.json").write_text(dumps({"metadata": {"total_size": total},
                                                             "weight_map": weight_map}))


def generation_config(meta: dict, cfg: dict) -> dict[str, Any]:
    """Special token ids, plus the sampling defaults a file may carry (`general.sampling.*`)."""
    gen: dict[str, Any] = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}
    for key, name in (("temp", "temperature"), ("top_k", "top_k"), ("top_p", "top_p")):
        if isinstance(meta.get(f"general.sampling.{key}"), (int, float)):
            gen[name] = meta[f"general.sampling.{key}"]
    if {"temperature", "top_k", "top_p"} & set(gen):
        gen["do_sample"] = True
    return gen


def _write_json_files(tmp: Path, cfg: dict, gen: dict, tok) -> None:
    (tmp / "config.json").write_text(dumps(cfg))
    (tmp / "generation_config.json").write_text(dumps(gen))
    (tmp / "tokenizer.json").write_text(tok.tokenizer_json)
    (tmp / "tokenizer_config.json").write_text(dumps(tok.tokenizer_config))


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder to `out`; an old `out` (only with force) is moved aside, then removed."""
    old = out.parent / f".{out.name}.import-old"
    _remove(old)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    elif out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    _remove(old)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()
