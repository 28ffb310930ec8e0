"""The training recipe runs end to end on CPU: prepare -> train -> interrupt/resume -> export -> our loader."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch
from sparsedial.engine.loader import load_model

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_tiny_model.py"


def _script():
    spec = importlib.util.spec_from_file_location("train_tiny_model", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def test_prepare_train_resume_export(tmp_path):
    t = _script()
    data, run, out = tmp_path / "data", tmp_path / "run", tmp_path / "model"
    t.main(["prepare", "--data", str(data), "--vocab-size", "400", "--max-files", "6"])
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["vocab_size"] == 400 and manifest["splits"]["train"]["tokens"] > 1000
    small = ["--data", str(data), "--run", str(run), "--hidden-size", "32", "--num-layers", "1",
             "--num-heads", "2", "--num-kv-heads", "1", "--intermediate-size", "64", "--seq-len", "32",
             "--batch-size", "2", "--eval-every", "2", "--eval-batches", "1", "--save-every", "2"]
    t.main(["train", *small, "--max-steps", "4", "--minutes", "0"])  # zero budget: stops at once, saves
    assert json.loads((run / "train_config.json").read_text())["max_steps"] == 4
    t.main(["train", *small, "--max-steps", "4"])  # resumes the same run to its end
    state = torch.load(run / "state.pt", weights_only=False)
    assert state["step"] == 4 and [r["step"] for r in state["log"]] == [2, 4]
    t.main(["export", "--data", str(data), "--run", str(run), "--out", str(out)])
    lm = load_model(out)
    assert lm.config.vocab_size == 400 and lm.tokenizer.eos_token == "<|endoftext|>"
