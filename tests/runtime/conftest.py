"""Small random Llama/Qwen2/Mistral checkpoints, saved in HF layout by transformers itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

EMBEDDED = Path(__file__).resolve().parents[2] / "models" / "stdlib-tiny"

# name -> (transformers class names, config overrides). Shapes are tiny; each case exercises one family feature.
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2)),
    "llama3-rope": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=2, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=32))),
    "llama-bias": ("LlamaConfig", "LlamaForCausalLM", dict(attention_bias=True, mlp_bias=True)),
    "smollm-tied": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, use_sliding_window=False)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=None)),
    "mistral-window": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=5)),
}


def make_hf_model(family: str, seed: int = 0):
    import transformers

    cfg_name, model_name, overrides = FAMILIES[family]
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
                bos_token_id=1, eos_token_id=2)
    cfg = getattr(transformers, cfg_name)(**{**base, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).eval()
    with torch.no_grad():  # random biases/norm weights too, so a missed term shows up in the logits
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0, 0.5 if "norm" in name else 0.1).add_(1.0 if "norm" in name else 0.0)
    return model


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """family -> (saved directory, the transformers model)."""
    out = {}
    for family in FAMILIES:
        d = tmp_path_factory.mktemp(family)
        model = make_hf_model(family)
        model.save_pretrained(d, safe_serialization=True)
        out[family] = (d, model)
    return out


@pytest.fixture(scope="session")
def embedded():
    from sparsedial.engine.loader import load_model

    return load_model(EMBEDDED)
