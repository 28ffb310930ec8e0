"""A tiny random Llama with the embedded model's tokenizer, and a little calibration text."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

EMBEDDED = Path(__file__).resolve().parents[2] / "models" / "stdlib-tiny"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny")
    cfg = LlamaConfig(vocab_size=6144, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(d, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(EMBEDDED / f, d / f)
    return d


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    from sparsedial import corpus

    f = tmp_path_factory.mktemp("calib") / "calib.py"
    f.write_text("\n".join(x.text for x in corpus.load_split("train")[:3]))
    return f
