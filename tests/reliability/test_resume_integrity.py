"""EPTS resume survives kills and damaged files in its work folder.

Every rerun must finish without a traceback and return LoRA tensors bit-identical (torch.equal) to an
uninterrupted run without a work folder, which is computed independently of the resume code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from sparsedial.compress import epts as epts_mod
from sparsedial.compress.calibration import CalibrationConfig, calibration_tokens
from sparsedial.compress.epts import EPTSConfig, reconstruct
from sparsedial.compress.nested import build_nested, dense_input_norms
from sparsedial.engine.loader import load_model

EMBEDDED = Path(__file__).resolve().parents[2] / "models" / "stdlib-tiny"
CFG = EPTSConfig(epochs=1, batch_size=2)
N_LAYERS = 3  # three blocks, so a fallback can land strictly between the start and the end


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model, masks, calibration tokens, reference LoRA tensors of an uninterrupted run)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparsedial import corpus

    d = tmp_path_factory.mktemp("tiny3")
    hf = LlamaConfig(vocab_size=6144, hidden_size=64, intermediate_size=96, num_hidden_layers=N_LAYERS,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(hf).save_pretrained(d, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(EMBEDDED / f, d / f)
    calib = d / "calib.py"
    calib.write_text("\n".join(x.text for x in corpus.load_split("train")[:3]))
    lm = load_model(d)
    tokens = calibration_tokens(lm.tokenizer, CalibrationConfig(str(calib), 4, 32))
    masks = build_nested(lm.model, dense_input_norms(lm.model, tokens, progress=False))
    reference = reconstruct(lm.model, masks, tokens, CFG, progress=False)
    return lm.model, masks, tokens, reference


def _run(setup, work_dir: Path, cfg: EPTSConfig = CFG) -> dict[str, torch.Tensor]:
    model, masks, tokens, _ = setup
    return reconstruct(model, masks, tokens, cfg, work_dir=work_dir, progress=False)


def _assert_bit_identical(got: dict[str, torch.Tensor], setup) -> None:
    reference = setup[3]
    assert got.keys() == reference.keys()
    differ = [k for k in reference if not torch.equal(got[k], reference[k])]
    assert not differ, f"{len(differ)} of {len(reference)} tensors differ, e.g. {differ[:3]}"


def _interrupt_at_block(monkeypatch, setup, work_dir: Path, block: int) -> None:
    """A run killed while training `block`: blocks before it are checkpointed, nothing after."""
    real = epts_mod.train_block

    def crash(layer, b, *args, **kw):
        if b == block:
            raise KeyboardInterrupt
        return real(layer, b, *args, **kw)

    monkeypatch.setattr(epts_mod, "train_block", crash)
    with pytest.raises(KeyboardInterrupt):
        _run(setup, work_dir)
    monkeypatch.setattr(epts_mod, "train_block", real)


def _kill_on_replace(monkeypatch, matches, truncate_src: bool = False) -> None:
    """Raise KeyboardInterrupt (a kill) at the first os.replace whose target `matches`; with
    `truncate_src` the temp file is cut to half first, as if the kill came mid-write."""
    real = os.replace

    def fake(src, dst, *args, **kw):
        if matches(Path(dst)):
            if truncate_src:
                data = Path(src).read_bytes()
                Path(src).write_bytes(data[: len(data) // 2])
            raise KeyboardInterrupt
        return real(src, dst, *args, **kw)

    monkeypatch.setattr(os, "replace", fake)


def _newest_streams_file(work_dir: Path) -> Path:
    """The highest-numbered file holding the x_mix activations (the last finished block's state)."""
    files = [p for p in work_dir.glob("*.safetensors") if "x_mix" in set(safe_open(p, "pt").keys())]
    return max(files, key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:  # same size, the second half replaced: only a checksum can tell
        half = len(data) // 2
        path.write_bytes(data[:half] + bytes((b ^ 0x5A) for b in data[half:]))


def _resume_lines(capsys) -> list[str]:
    return [ln for ln in capsys.readouterr().out.splitlines() if "resum" in ln.lower()]


@pytest.mark.parametrize("killed_after", [0, 1, 2])
def test_kill_before_manifest_replace_is_bit_identical(setup, tmp_path, monkeypatch, killed_after):
    seen = []

    def manifest_of_block(dst: Path) -> bool:  # the manifest written after block `killed_after`
        if dst.name != "progress.json":
            return False
        seen.append(dst)
        return len(seen) == killed_after + 1

    _kill_on_replace(monkeypatch, manifest_of_block)
    with pytest.raises(KeyboardInterrupt):
        _run(setup, tmp_path)
    monkeypatch.undo()
    # the kill hit between block `killed_after`'s files and the manifest naming them
    assert (tmp_path / f"state{killed_after}.safetensors").is_file()
    if killed_after:
        assert json.loads((tmp_path / "progress.json").read_text())["next_block"] == killed_after
    _assert_bit_identical(_run(setup, tmp_path), setup)


def test_kill_while_writing_state_is_bit_identical(setup, tmp_path, monkeypatch):
    _kill_on_replace(monkeypatch, lambda dst: dst.name.startswith("state1"), truncate_src=True)
    with pytest.raises(KeyboardInterrupt):
        _run(setup, tmp_path)
    monkeypatch.undo()
    _assert_bit_identical(_run(setup, tmp_path), setup)


@pytest.mark.parametrize("how", ["truncated", "garbage"])
@pytest.mark.parametrize("stopped_at", [2, None])
def test_damaged_last_state_restarts_from_last_good_block(setup, tmp_path, monkeypatch, capsys, how,
                                                           stopped_at):
    if stopped_at is None:
        _run(setup, tmp_path)  # finished run: the last state is after block 2
        damaged_block = N_LAYERS - 1
    else:
        _interrupt_at_block(monkeypatch, setup, tmp_path, stopped_at)
        damaged_block = stopped_at - 1
    _damage(_newest_streams_file(tmp_path), how)
    capsys.readouterr()
    _assert_bit_identical(_run(setup, tmp_path), setup)
    lines = _resume_lines(capsys)
    assert len(lines) == 1 and f"state{damaged_block}.safetensors is corrupt" in lines[0], lines
    assert f"restarting at block {damaged_block} " in lines[0], lines


@pytest.mark.parametrize("damage", ["invalid json", "empty", "missing", "not a manifest"])
def test_corrupt_manifest_resumes_from_verifiable_state(setup, tmp_path, monkeypatch, capsys, damage):
    _interrupt_at_block(monkeypatch, setup, tmp_path, 2)
    manifest = tmp_path / "progress.json"
    if damage == "missing":
        manifest.unlink()
    else:
        manifest.write_text({"invalid json": '{"next_block": 2, "files": {', "empty": "",
                             "not a manifest": "[1, 2]"}[damage])
    capsys.readouterr()
    _assert_bit_identical(_run(setup, tmp_path), setup)
    lines = _resume_lines(capsys)
    assert len(lines) == 1 and "restarting at block 2 " in lines[0], lines  # both blocks verify alone


def test_nothing_verifies_starts_from_scratch(setup, tmp_path, monkeypatch, capsys):
    _interrupt_at_block(monkeypatch, setup, tmp_path, 2)
    (tmp_path / "progress.json").write_text("garbage")
    for p in tmp_path.glob("*.safetensors"):
        _damage(p, "truncated")
    capsys.readouterr()
    _assert_bit_identical(_run(setup, tmp_path), setup)
    lines = _resume_lines(capsys)
    assert len(lines) == 1 and "scratch" in lines[0], lines


def test_damaged_lora_file_falls_back_before_it(setup, tmp_path, monkeypatch, capsys):
    _interrupt_at_block(monkeypatch, setup, tmp_path, 2)
    _damage(tmp_path / "block1.safetensors", "garbage")
    capsys.readouterr()
    _assert_bit_identical(_run(setup, tmp_path), setup)
    lines = _resume_lines(capsys)
    assert len(lines) == 1 and "block1.safetensors is corrupt" in lines[0], lines
    assert "restarting at block 1 " in lines[0], lines


def test_disk_use_is_bounded_and_manifest_names_every_file(setup, tmp_path):
    _run(setup, tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    lora = [f"block{b}.safetensors" for b in range(N_LAYERS)]
    assert names == sorted(lora + ["progress.json", "state1.safetensors", "state2.safetensors"])
    manifest = json.loads((tmp_path / "progress.json").read_text())
    assert manifest["next_block"] == N_LAYERS
    assert sorted(manifest["files"]) == sorted(lora + ["state1.safetensors", "state2.safetensors"])


def test_other_config_is_refused_even_without_manifest(setup, tmp_path, monkeypatch):
    _interrupt_at_block(monkeypatch, setup, tmp_path, 2)
    with pytest.raises(ValueError, match="another config"):
        _run(setup, tmp_path, EPTSConfig(epochs=2, batch_size=2))
    (tmp_path / "progress.json").unlink()  # the state files still say which run they belong to
    with pytest.raises(ValueError, match="another config"):
        _run(setup, tmp_path, EPTSConfig(epochs=2, batch_size=2))
