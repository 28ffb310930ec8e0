"""Measure the embedded model and write its model card and the docs/quality.md section.

    python benchmarks/eval_embedded.py [--model models/stdlib-tiny]

Measures, on this machine: held-out perplexity with sparsedial's runtime and with transformers' own
LlamaForCausalLM (they must agree), a unigram baseline, bits per byte, validation perplexity, and seeded
sample completions of Python prompts. Writes `<model>/README.md` and the `embedded-model` section of
docs/quality.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import DOCS, machine, write_section
from sparsedial.engine.loader import load_model
from sparsedial.engine.sampling import SamplingParams

from sparsedial import corpus
from sparsedial.evaluate import perplexity, token_stream, unigram_perplexity
from sparsedial.testing import generate

PROMPTS = ["def fibonacci(n):", "import os\n\n\ndef read_lines(path):", "class Stack:\n    def __init__(self):",
           "    for key, value in sorted("]
SEQ_LEN = 512


def measure(model_dir: Path) -> dict:
    from transformers import AutoModelForCausalLM

    lm = load_model(model_dir, dtype="float32")
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out: dict = {"machine": machine()}
    for split in ("heldout", "val"):
        texts = [f.text for f in corpus.load_split(split)]
        ids = token_stream(lm.tokenizer, texts)
        n_bytes = sum(len(t.encode()) for t in texts)
        ours = perplexity(lm.model, ids, n_bytes, seq_len=SEQ_LEN)
        out[split] = {"sha256": corpus.corpus_sha256(corpus.load_split(split)), "ours": ours.__dict__}
        if split == "heldout":
            theirs = perplexity(lambda x: ref(input_ids=x).logits, ids, n_bytes, seq_len=SEQ_LEN)
            out[split]["transformers"] = theirs.__dict__
            train_ids = token_stream(lm.tokenizer, [f.text for f in corpus.load_split("train")])
            out[split]["unigram"] = unigram_perplexity(train_ids, ids, lm.config.vocab_size)
    params = SamplingParams(max_tokens=60, temperature=0.8, top_p=0.95, seed=0)
    out["samples"] = [(p, c.text) for p, c in zip(PROMPTS, generate(lm.model, lm.tokenizer, PROMPTS, params))]
    out["n_params"] = sum(p.numel() for p in lm.model.parameters())
    return out


def quality_section(m: dict, model_dir: Path) -> str:
    h = m["heldout"]
    return f"""## Embedded model: {model_dir.name}

Measured by `python benchmarks/eval_embedded.py` on {m['machine']}.
Held-out data: the stdlib modules in `sparsedial.corpus.HELDOUT_MODULES` of Python {corpus.python_version()}
(sha256 `{h['sha256'][:16]}...`), {h['ours']['tokens']} predicted tokens in windows of {SEQ_LEN}.

| model | held-out perplexity | bits per byte |
|---|---|---|
| stdlib-tiny, sparsedial runtime (fp32) | {h['ours']['perplexity']:.3f} | {h['ours']['bits_per_byte']:.4f} |
| stdlib-tiny, transformers LlamaForCausalLM (fp32) | {h['transformers']['perplexity']:.3f} | {h['transformers']['bits_per_byte']:.4f} |
| unigram baseline (training-token frequencies, add-one) | {h['unigram']:.1f} | {math.log2(h['unigram']) * h['ours']['tokens'] / h['ours']['bytes']:.4f} |

The two implementations agree to {abs(h['ours']['nll'] - h['transformers']['nll']):.1e} nats per token.
Validation split perplexity (used for checkpoint selection only): {m['val']['ours']['perplexity']:.3f}.
"""


def model_card(m: dict, model_dir: Path) -> str:
    t = json.loads((model_dir / "training.json").read_text())
    c, s = t["config"], t["splits"]
    h = m["heldout"]
    samples = "\n\n".join(f"```python\n{p}{txt}\n```" for p, txt in m["samples"])
    return f"""# stdlib-tiny

sparsedial's embedded model: a {m['n_params'] / 1e6:.2f} M-parameter Llama-architecture causal LM trained from
scratch on the Python standard library, shipped so that the engine, the compressor and the tests have a
real model without any download. Hugging Face layout: `AutoModelForCausalLM` and `AutoTokenizer` load it.

## Model
`LlamaForCausalLM`: hidden {c['hidden_size']}, {c['num_layers']} layers, {c['num_heads']} heads / {c['num_kv_heads']} KV heads
(GQA, head dim {c['hidden_size'] // c['num_heads']}), SwiGLU {c['intermediate_size']}, RoPE theta {c['rope_theta']:g},
context {c['max_position_embeddings']}, tied embeddings, vocabulary {json.loads((model_dir / 'config.json').read_text())['vocab_size']}
(byte-level BPE trained with `tokenizers` on the training split; `<|endoftext|>` separates documents).
Weights stored in {t['stored_dtype']}.

## Training data
The `.py` files of the CPython {t['corpus']['python_version']} standard library (test folders and site-packages
excluded), in sorted path order (`sparsedial.corpus`). Splits by module:

| split | files | bytes | tokens | sha256 |
|---|---|---|---|---|
""" + "".join(f"| {k} | {v['files']} | {v['bytes']} | {v['tokens']} | `{v['sha256'][:16]}...` |\n"
             for k, v in s.items()) + f"""
Held-out modules (never trained on, never used for selection): {', '.join(t['corpus']['heldout_modules'])}.
Validation modules (checkpoint selection): {', '.join(t['corpus']['val_modules'])}.

## Training
`scripts/train_tiny_model.py` (prepare, train, export) on {t['device']}. AdamW (betas 0.9/0.95, weight decay
{c['weight_decay']}), peak lr {c['lr']}, {c['warmup_steps']} warmup steps then cosine to {c['min_lr_ratio']}x over {c['max_steps']} steps,
batch {c['batch_size']} x {c['seq_len']} tokens, gradient clip {c['grad_clip']}, seed {c['seed']}. Ran {t['steps_run']} steps,
{t['tokens_seen'] / 1e6:.1f} M tokens seen ({t['tokens_seen'] / s['train']['tokens']:.1f} epochs), {t['wall_s']:.0f} s; the shipped weights are the
best validation checkpoint (step {t['best_step']}, validation loss {t['best_val_loss']:.4f}). The recipe came from a
six-run sweep (docs/training-sweep.md): more epochs overfit this small corpus.

## Evaluation
Measured by `benchmarks/eval_embedded.py` on {m['machine']}:

| | held-out perplexity | bits per byte |
|---|---|---|
| this model (sparsedial runtime) | {h['ours']['perplexity']:.3f} | {h['ours']['bits_per_byte']:.4f} |
| this model (transformers) | {h['transformers']['perplexity']:.3f} | {h['transformers']['bits_per_byte']:.4f} |
| unigram baseline | {h['unigram']:.1f} | |

## Samples
Seeded sampling (temperature 0.8, top-p 0.95, seed 0, 60 tokens):

{samples}

## Limitations
A model of this size writes Python-looking code with plausible names and structure but no reliable
meaning; greedy decoding loops quickly. It exists to measure serving and pruning, not to write programs.
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path(__file__).resolve().parent.parent / "models" / "stdlib-tiny")
    args = ap.parse_args(argv)
    m = measure(args.model)
    print(json.dumps({k: v for k, v in m.items() if k != "samples"}, indent=2))
    write_section(DOCS / "quality.md", "embedded-model", quality_section(m, args.model), "Quality")
    (args.model / "README.md").write_text(model_card(m, args.model))
    print(f"wrote {args.model / 'README.md'} and {DOCS / 'quality.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
