"""Train sparsedial's embedded model (`models/stdlib-tiny`) on the Python standard library.

Three reproducible steps, each resumable or cheap to repeat:

    python scripts/train_tiny_model.py prepare --data data/stdlib-tiny
        corpus of the running interpreter -> byte-level BPE tokenizer -> token files + manifest.json
    python scripts/train_tiny_model.py train --data data/stdlib-tiny --run runs/stdlib-tiny --minutes 30
        LlamaForCausalLM from scratch, seeded, AdamW + warmup/cosine, progress bar, a checkpoint every
        --save-every steps (rerun the same command to resume), the best-validation weights kept apart
    python scripts/train_tiny_model.py export --data data/stdlib-tiny --run runs/stdlib-tiny --out models/stdlib-tiny
        the best weights in HF layout (config, safetensors, tokenizer, generation_config, training.json)

`prepare` runs where the corpus is defined (its Python version is recorded); `train` runs anywhere
(CPU or CUDA) on the token files, so a GPU machine trains on exactly the corpus prepared here.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

EOS = "<|endoftext|>"


# --------------------------------------------------------------------------------------------- prepare
def prepare(data_dir: Path, vocab_size: int, max_files: int | None = None) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from sparsedial import corpus

    data_dir.mkdir(parents=True, exist_ok=True)
    splits = {s: corpus.load_split(s)[:max_files] for s in corpus.Split}  # max_files: quick test runs only
    train_texts = [f.text for f in splits[corpus.Split.TRAIN]]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tok.train_from_iterator(train_texts, trainer=trainer)  # the tokenizer never sees val/held-out text
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=None)
    hf_tok.model_max_length = 1024
    hf_tok.save_pretrained(data_dir / "tokenizer")
    eos_id = tok.token_to_id(EOS)

    manifest = {
        "python_version": corpus.python_version(),
        "vocab_size": tok.get_vocab_size(),
        "eos_id": eos_id,
        "heldout_modules": list(corpus.HELDOUT_MODULES),
        "val_modules": list(corpus.VAL_MODULES),
        "splits": {},
    }
    for split, files in splits.items():
        ids: list[int] = []
        for enc in tok.encode_batch([f.text for f in files]):
            ids.extend(enc.ids)
            ids.append(eos_id)  # documents are separated by EOS
        arr = np.asarray(ids, dtype=np.uint16)
        arr.tofile(data_dir / f"{split.value}.bin")
        nbytes = sum(len(f.text.encode()) for f in files)
        manifest["splits"][split.value] = {
            "files": len(files),
            "bytes": nbytes,
            "tokens": int(arr.size),
            "sha256": corpus.corpus_sha256(files),
        }
        print(f"{split.value}: {len(files)} files, {nbytes / 1e6:.2f} MB, {arr.size / 1e6:.2f} M tokens "
              f"({nbytes / arr.size:.2f} bytes/token)")
    (data_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))


# ----------------------------------------------------------------------------------------------- train
@dataclass
class TrainConfig:
    """Model shape and optimisation recipe (written into the run folder and the model card)."""

    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 6
    num_kv_heads: int = 2
    intermediate_size: int = 896
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    seq_len: int = 512
    batch_size: int = 64
    lr: float = 3e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 200
    max_steps: int = 4000
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 200
    eval_batches: int = 40


def _model_config(cfg: TrainConfig, vocab_size: int, eos_id: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
    )


def _device_name(device: str) -> str:
    import transformers

    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    return f"{name}, torch {torch.__version__}, transformers {transformers.__version__}"


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _batch(data: np.ndarray, cfg: TrainConfig, gen: torch.Generator, device: str) -> torch.Tensor:
    starts = torch.randint(0, data.size - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)
    rows = [torch.from_numpy(data[s : s + cfg.seq_len + 1].astype(np.int64)) for s in starts.tolist()]
    return torch.stack(rows).to(device)


@torch.no_grad()
def _evaluate(model, data: np.ndarray, cfg: TrainConfig, device: str, amp) -> float:
    """Mean next-token loss over fixed, non-overlapping windows (deterministic)."""
    model.eval()
    n_windows = min(cfg.eval_batches * cfg.batch_size, (data.size - 1) // cfg.seq_len)
    losses = []
    for i in range(0, n_windows, cfg.batch_size):
        idx = range(i, min(n_windows, i + cfg.batch_size))
        x = torch.stack([torch.from_numpy(data[j * cfg.seq_len : j * cfg.seq_len + cfg.seq_len + 1]
                                          .astype(np.int64)) for j in idx]).to(device)
        with amp():
            logits = model(input_ids=x[:, :-1]).logits
        losses.append(torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum").item())
    model.train()
    return sum(losses) / (n_windows * cfg.seq_len)


def train(data_dir: Path, run_dir: Path, cfg: TrainConfig, minutes: float, device: str, save_every: int) -> None:
    from contextlib import nullcontext

    from safetensors.torch import load_file, save_file
    from tqdm import tqdm
    from transformers import LlamaForCausalLM

    manifest = json.loads((data_dir / "manifest.json").read_text())
    train_data = np.fromfile(data_dir / "train.bin", dtype=np.uint16)
    val_data = np.fromfile(data_dir / "val.bin", dtype=np.uint16)
    run_dir.mkdir(parents=True, exist_ok=True)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"

    state_path = run_dir / "state.pt"
    cfg_path = run_dir / "train_config.json"
    if state_path.exists():  # resume: the run's own config wins over the command line
        cfg = TrainConfig(**json.loads(cfg_path.read_text()))
    else:
        cfg_path.write_text(json.dumps(asdict(cfg), indent=2))

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(_model_config(cfg, manifest["vocab_size"], manifest["eos_id"])).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95),
                            fused=device == "cuda")
    gen = torch.Generator().manual_seed(cfg.seed)
    log: list[dict] = []
    step, best_val, tokens_seen, elapsed_before = 0, float("inf"), 0, 0.0
    if state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=False)
        model.load_state_dict(load_file(run_dir / "last.safetensors", device=device), strict=False)
        model.tie_weights()
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        step, best_val, tokens_seen = state["step"], state["best_val"], state["tokens_seen"]
        elapsed_before, log = state["elapsed"], state["log"]
        print(f"resumed from step {step} (best val loss {best_val:.4f})")

    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device == "cuda" else nullcontext
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters on {device}; {train_data.size / 1e6:.2f} M train tokens")

    def save(final: bool = False) -> None:
        weights = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        save_file(weights, run_dir / "last.safetensors")
        torch.save({"opt": opt.state_dict(), "gen": gen.get_state(), "step": step, "best_val": best_val,
                    "device": _device_name(device),
                    "tokens_seen": tokens_seen, "elapsed": elapsed_before + time.time() - t0, "log": log},
                   run_dir / "state.pt.tmp")
        (run_dir / "state.pt.tmp").replace(state_path)  # atomic: an interrupted save never corrupts a run

    t0 = time.time()
    deadline = t0 + minutes * 60
    model.train()
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    while step < cfg.max_steps and time.time() < deadline:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        x = _batch(train_data, cfg, gen, device)
        with amp():
            logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        tokens_seen += x[:, :-1].numel()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{_lr_at(step, cfg):.2e}")
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            val = _evaluate(model, val_data, cfg, device, amp)
            log.append({"step": step, "tokens": tokens_seen, "train_loss": loss.item(), "val_loss": val,
                        "elapsed_s": elapsed_before + time.time() - t0})
            bar.write(f"step {step}: train {loss.item():.4f} val {val:.4f} (ppl {math.exp(val):.2f})")
            if val < best_val:
                best_val = val
                save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()
                           if k != "lm_head.weight"}, run_dir / "best.safetensors")
        if step % save_every == 0:
            save()
    bar.close()
    save()
    print(f"stopped at step {step}/{cfg.max_steps}; best val loss {best_val:.4f} (ppl {math.exp(best_val):.2f}); "
          f"{tokens_seen / 1e6:.1f} M tokens; {elapsed_before + time.time() - t0:.0f} s")


# ---------------------------------------------------------------------------------------------- export
def export(data_dir: Path, run_dir: Path, out_dir: Path, dtype: str, max_shard_size: str) -> None:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM

    manifest = json.loads((data_dir / "manifest.json").read_text())
    cfg = TrainConfig(**json.loads((run_dir / "train_config.json").read_text()))
    state = torch.load(run_dir / "state.pt", map_location="cpu", weights_only=False)
    model = LlamaForCausalLM(_model_config(cfg, manifest["vocab_size"], manifest["eos_id"]))
    model.load_state_dict(load_file(run_dir / "best.safetensors"), strict=False)
    model.tie_weights()
    model.to(getattr(torch, dtype))
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size)
    AutoTokenizer.from_pretrained(data_dir / "tokenizer").save_pretrained(out_dir)
    # The generic fast-tokenizer class name loads in every transformers version we support.
    tok_cfg_path = out_dir / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only", "backend"):
        tok_cfg.pop(key, None)
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2))
    GenerationConfig(bos_token_id=manifest["eos_id"], eos_token_id=manifest["eos_id"], do_sample=True,
                     temperature=0.8, top_p=0.95, max_new_tokens=128).save_pretrained(out_dir)
    best = min(state["log"], key=lambda r: r["val_loss"])
    training = {
        "corpus": {k: manifest[k] for k in ("python_version", "heldout_modules", "val_modules")},
        "splits": manifest["splits"],
        "config": asdict(cfg),
        "steps_run": state["step"],
        "tokens_seen": state["tokens_seen"],
        "wall_s": round(state["elapsed"], 1),
        "best_step": best["step"],
        "best_val_loss": best["val_loss"],
        "log": state["log"],
        "stored_dtype": dtype,
        "device": state.get("device", "unknown"),
    }
    (out_dir / "training.json").write_text(json.dumps(training, indent=2))
    print(f"exported best step {best['step']} (val loss {best['val_loss']:.4f}) to {out_dir}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare")
    pp.add_argument("--data", type=Path, default=Path("data/stdlib-tiny"))
    pp.add_argument("--vocab-size", type=int, default=6144)
    pp.add_argument("--max-files", type=int, default=None, help="use only the first N files per split (tests)")
    pt = sub.add_parser("train")
    pt.add_argument("--data", type=Path, default=Path("data/stdlib-tiny"))
    pt.add_argument("--run", type=Path, default=Path("runs/stdlib-tiny"))
    pt.add_argument("--minutes", type=float, default=30.0, help="wall-clock budget of this invocation")
    pt.add_argument("--device", default="auto")
    pt.add_argument("--save-every", type=int, default=100)
    for f, default in asdict(TrainConfig()).items():
        pt.add_argument(f"--{f.replace('_', '-')}", type=type(default), default=default)
    pe = sub.add_parser("export")
    pe.add_argument("--data", type=Path, default=Path("data/stdlib-tiny"))
    pe.add_argument("--run", type=Path, default=Path("runs/stdlib-tiny"))
    pe.add_argument("--out", type=Path, default=Path("models/stdlib-tiny"))
    pe.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    pe.add_argument("--max-shard-size", default="50MB")
    args = p.parse_args(argv)
    if args.cmd == "prepare":
        prepare(args.data, args.vocab_size, args.max_files)
    elif args.cmd == "train":
        cfg = TrainConfig(**{f: getattr(args, f) for f in asdict(TrainConfig())})
        train(args.data, args.run, cfg, args.minutes, args.device, args.save_every)
    else:
        export(args.data, args.run, args.out, args.dtype, args.max_shard_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
