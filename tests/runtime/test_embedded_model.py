"""The shipped model is a real model: small, loadable by transformers, and better than a unigram baseline."""

from __future__ import annotations

import json

from sparsedial.evaluate import perplexity, token_stream, unigram_perplexity
from transformers import AutoTokenizer

from sparsedial import corpus

from .conftest import EMBEDDED


def test_files_and_size():
    names = {p.name for p in EMBEDDED.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"} <= names
    total = sum(p.stat().st_size for p in EMBEDDED.iterdir())
    assert total < 25 * 2**20, f"embedded model is {total / 2**20:.1f} MiB, budget 25 MiB"
    assert json.loads((EMBEDDED / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_tokenizer_loads_with_autotokenizer():
    tok = AutoTokenizer.from_pretrained(EMBEDDED)
    text = "def f(x):\n    return x ** 2  # square\n"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert 4000 <= tok.vocab_size <= 8192


def test_beats_unigram_on_a_heldout_module(embedded):
    """One held-out module (fast): the model must be far better than token frequencies."""
    texts = [f.text for f in corpus.load_split("heldout") if f.relpath == "textwrap.py"]
    ids = token_stream(embedded.tokenizer, texts)
    r = perplexity(embedded.model, ids, len(texts[0].encode()), seq_len=256, progress=False)
    train_ids = token_stream(embedded.tokenizer, [f.text for f in corpus.load_split("train")[:60]])
    uni = unigram_perplexity(train_ids, ids, embedded.config.vocab_size)
    assert r.perplexity < uni / 5, (r.perplexity, uni)
