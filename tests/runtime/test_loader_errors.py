"""Every broken model directory gives a ModelLoadError that names the file and the tensor."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from sparsedial.engine.loader import load_model

from sparsedial.errors import ModelLoadError, UnsupportedModelError


@pytest.fixture
def llama_dir(hf_checkpoints, tmp_path):
    src, _ = hf_checkpoints["llama"]
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    return dst


def test_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "nope")


def test_unsupported_architecture(llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (llama_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="'gpt2'.*GPT2LMHeadModel"):
        load_model(llama_dir, with_tokenizer=False)


def test_unsupported_rope(llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    cfg.pop("rope_parameters", None)
    (llama_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="yarn"):
        load_model(llama_dir, with_tokenizer=False)


def test_missing_tensor(llama_dir):
    sd = load_file(llama_dir / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, llama_dir / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' is missing"):
        load_model(llama_dir, with_tokenizer=False)


def test_mismatched_shape(llama_dir):
    sd = load_file(llama_dir / "model.safetensors")
    sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 64)
    save_file(sd, llama_dir / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj"
                                             r"\.weight' has shape \(3, 64\), expected \(32, 64\)"):
        load_model(llama_dir, with_tokenizer=False)


def test_unexpected_tensor(llama_dir):
    sd = load_file(llama_dir / "model.safetensors")
    sd["model.layers.9.extra.weight"] = torch.zeros(2)
    save_file(sd, llama_dir / "model.safetensors")
    with pytest.raises(ModelLoadError, match="unexpected tensor 'model.layers.9.extra.weight'"):
        load_model(llama_dir, with_tokenizer=False)


@pytest.mark.parametrize("damage", ["truncate", "garbage_header"])
def test_corrupt_safetensors(llama_dir, damage):
    f = llama_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 8 + data[8:])
    with pytest.raises(ModelLoadError, match="model.safetensors: corrupt or unreadable"):
        load_model(llama_dir, with_tokenizer=False)


def test_missing_shard(hf_checkpoints, tmp_path):
    _, ref = hf_checkpoints["llama"]
    ref.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelLoadError, match=f"names shard {shard.name}, which is missing"):
        load_model(tmp_path, with_tokenizer=False)


def test_no_weights(llama_dir):
    (llama_dir / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no model.safetensors"):
        load_model(llama_dir, with_tokenizer=False)


def test_missing_tokenizer(llama_dir):
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        load_model(llama_dir, with_tokenizer=True)
