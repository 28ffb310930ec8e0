"""EPTS end to end on a tiny model: exact tiers, equality with an independently merged model, resume,
tamper detection, HF export, and the CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from sparsedial.compress import epts as epts_mod
from sparsedial.compress.calibration import CalibrationConfig, calibration_tokens
from sparsedial.compress.epts import EPTSConfig, reconstruct
from sparsedial.compress.export import export_tier_hf, load_elastic_for_eval, tier_weights
from sparsedial.compress.nested import build_nested, dense_input_norms
from sparsedial.compress.pipeline import compress_epts
from sparsedial.engine.elastic_format import (
    LINEAR_NAMES,
    keep_count,
    read_elastic,
    unpack_mask24,
    write_elastic_json,
)
from sparsedial.engine.loader import load_model

from sparsedial.cli import main
from sparsedial.errors import ModelLoadError

TIERS = ["dense", "30%", "50%", "70%", "90%", "2:4"]


@pytest.fixture(scope="module")
def elastic_dir(tiny_model_dir, calib_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("elastic") / "m"
    compress_epts(tiny_model_dir, out, TIERS, CalibrationConfig(str(calib_file), 8, 32),
                  EPTSConfig(epochs=2, batch_size=4, high_rank=4), progress=False)
    return out


def test_checkpoint_layout_and_lora_trained(elastic_dir):
    spec, tensors = read_elastic(elastic_dir)
    assert [t.name for t in spec.tiers] == TIERS and spec.method == "epts"
    assert {"model.safetensors", "elastic.safetensors", "config.json"} <= set(json.loads(
        (elastic_dir / "elastic.json").read_text())["files"])
    b = tensors["model.layers.1.mlp.down_proj.lora.3.B"]
    assert b.abs().sum() > 0  # B starts at zero: training moved it
    assert tensors["model.layers.0.mlp.up_proj.lora.8.A"].shape[0] == 4  # high_rank above 70%


def test_every_tier_has_exact_sparsity_after_merge(elastic_dir):
    lm, spec, tensors = load_elastic_for_eval(elastic_dir)
    for tier in spec.tiers:
        with tier_weights(lm.model, spec, tensors, tier) as model:
            for layer in model.model.layers:
                for n in LINEAR_NAMES:
                    w = layer.get_submodule(n).weight
                    kept = (w != 0).sum(1)
                    if tier.kind == "dense":
                        assert (kept == w.shape[1]).all()
                    elif tier.kind == "nm":
                        assert ((w != 0).view(w.shape[0], -1, 4).sum(-1) <= 2).all()
                    else:  # LoRA merged under the mask: exactly keep(s) per row (no kept weight is 0.0)
                        assert (kept == keep_count(w.shape[1], tier.sparsity)).all(), (tier.name, n)


def test_tier_equals_independently_merged_transformers_model(elastic_dir, tiny_model_dir):
    """Tier k of the elastic checkpoint == transformers' model with (W + sum B_g A_g) * M_k set by hand."""
    from transformers import AutoModelForCausalLM

    spec, tensors = read_elastic(elastic_dir)
    lm, _, _ = load_elastic_for_eval(elastic_dir)
    tokens = torch.randint(0, 6144, (2, 12), generator=torch.Generator().manual_seed(0))
    for name in ("70%", "2:4"):
        tier = spec.tier(name)
        ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            for i, layer in enumerate(ref.model.layers):
                for n in LINEAR_NAMES:
                    full = f"model.layers.{i}.{n}"
                    lin = layer.get_submodule(n)
                    delta = sum(tensors[f"{full}.lora.{g}.B"].float() @ tensors[f"{full}.lora.{g}.A"].float()
                                for g in tier.lora_groups
                                if not (g == 0 and int(tensors[f"{full}.lora0_off"]) and tier.sparsity <= 0.4))
                    if tier.kind == "nm":
                        mask = unpack_mask24(tensors[f"{full}.mask24"])
                    else:
                        mask = tensors[f"{full}.drop_level"].int() > round(tier.sparsity * 100)
                    lin.weight.copy_((lin.weight + delta) * mask)
            expected = ref(input_ids=tokens).logits
            with tier_weights(lm.model, spec, tensors, tier) as model:
                got = model(tokens)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_export_tier_as_plain_hf_checkpoint(elastic_dir, tmp_path):
    sparsity = export_tier_hf(elastic_dir, "50%", tmp_path / "hf50")
    assert 0.49 < sparsity <= 0.5
    plain = load_model(tmp_path / "hf50")
    w = plain.model.model.layers[0].mlp.gate_proj.weight
    assert ((w == 0).float().mean() - 0.5).abs() < 0.02


@pytest.mark.parametrize("damage", ["flip_byte", "version", "missing_tensor"])
def test_load_rejects_tampered_checkpoints(elastic_dir, tmp_path, damage):
    bad = tmp_path / "bad"
    shutil.copytree(elastic_dir, bad)
    meta = json.loads((bad / "elastic.json").read_text())
    if damage == "flip_byte":
        data = bytearray((bad / "elastic.safetensors").read_bytes())
        data[-10] ^= 0xFF
        (bad / "elastic.safetensors").write_bytes(bytes(data))
        match = "elastic.safetensors: sha256 does not match"
    elif damage == "version":
        meta["version"] = 99
        match = "format version 99 is not supported"
    else:
        meta["linears"].append("model.layers.7.mlp.up_proj")
        match = "names linear 'model.layers.7.mlp.up_proj', which the base model lacks"
    write_elastic_json(bad, meta)  # re-sealed: the check under test fires, not the edit detection
    with pytest.raises(ModelLoadError, match=match):
        load_elastic_for_eval(bad)


@pytest.mark.parametrize("streams", ["mixed", "own"])
def test_epts_resumes_after_interruption(tiny_model_dir, calib_file, tmp_path, monkeypatch, streams):
    lm = load_model(tiny_model_dir)
    tokens = calibration_tokens(lm.tokenizer, CalibrationConfig(str(calib_file), 4, 32))
    masks = build_nested(lm.model, dense_input_norms(lm.model, tokens, progress=False))
    cfg = EPTSConfig(epochs=1, batch_size=2, streams=streams)
    full = reconstruct(lm.model, masks, tokens, cfg, progress=False)

    real = epts_mod.train_block
    def crash_on_block_1(layer, block, *args, **kw):
        if block == 1:
            raise KeyboardInterrupt
        return real(layer, block, *args, **kw)

    monkeypatch.setattr(epts_mod, "train_block", crash_on_block_1)
    with pytest.raises(KeyboardInterrupt):
        reconstruct(lm.model, masks, tokens, cfg, work_dir=tmp_path, progress=False)
    assert json.loads((tmp_path / "progress.json").read_text())["next_block"] == 1
    monkeypatch.setattr(epts_mod, "train_block", real)
    resumed = reconstruct(lm.model, masks, tokens, cfg, work_dir=tmp_path, progress=False)
    assert resumed.keys() == full.keys()
    for k in full:
        torch.testing.assert_close(resumed[k], full[k])
    with pytest.raises(ValueError, match="another config"):
        reconstruct(lm.model, masks, tokens, EPTSConfig(epochs=2, batch_size=2), work_dir=tmp_path, progress=False)
    other = "band" if streams == "own" else "own"
    with pytest.raises(ValueError, match="another config"):
        reconstruct(lm.model, masks, tokens, EPTSConfig(epochs=1, batch_size=2, streams=other), work_dir=tmp_path,
                    progress=False)


def test_stream_plan_by_hand():
    """Default MSFM weights: low 0.3 over 3 groups, mid 0.3 over 4 groups + 2:4, high 0.4 over 2 groups."""
    w = EPTSConfig().mixing_weights()
    torch.testing.assert_close(torch.tensor(w), torch.tensor([.1] * 3 + [.06] * 4 + [.2] * 2 + [.06]))
    assert EPTSConfig().stream_plan() == ([0] * 10, w)
    stream, weights = EPTSConfig(streams="band").stream_plan()
    assert stream == [0, 0, 0, 1, 1, 1, 1, 2, 2, 1]
    torch.testing.assert_close(torch.tensor(weights), torch.tensor([1 / 3] * 3 + [.2] * 4 + [.5] * 2 + [.2]))
    assert EPTSConfig(streams="own").stream_plan() == (list(range(10)), [1.0] * 10)
    with pytest.raises(ValueError, match="streams must be"):
        EPTSConfig(streams="per-tier")
    with pytest.raises(ValueError, match="no weight"):  # the high band gets nothing from this mix
        EPTSConfig(streams="band", msfm_weights=(.1,) * 7 + (0, 0) + (.3,)).stream_plan()


@pytest.mark.parametrize("streams", ["band", "own"])
def test_streams_mix_only_their_own_paths(tiny_model_dir, calib_file, streams):
    """With several streams, the next block's stream k depends on stream k alone: perturbing another stream
    leaves it bit-identical, and a single-stream mix is the weighted sum of the paths on that one stream."""
    lm = load_model(tiny_model_dir)
    tokens = calibration_tokens(lm.tokenizer, CalibrationConfig(str(calib_file), 4, 32))
    masks = build_nested(lm.model, dense_input_norms(lm.model, tokens, progress=False))
    cfg = EPTSConfig(epochs=1, batch_size=2, streams=streams)
    layer = lm.model.model.layers[0]
    ctx = epts_mod.BlockContext.build(lm.model, tokens.shape[1], torch.float32)
    x = epts_mod.embed(lm.model, tokens).float()
    lora = epts_mod._init_lora(layer, cfg, torch.Generator().manual_seed(0))
    for n in LINEAR_NAMES:  # a nonzero delta in every group, so the paths differ
        lora.B[n] = [torch.randn_like(b) * 0.02 for b in lora.B[n]]
    stream_of, _ = cfg.stream_plan()
    n_streams = max(stream_of) + 1
    xs = x.unsqueeze(0).repeat(n_streams, 1, 1, 1)
    base = epts_mod._mix(layer, 0, ctx, xs, masks, lora, cfg, torch.Generator().manual_seed(1))
    moved = xs.clone()
    moved[n_streams - 1] += 0.5 * torch.randn_like(moved[n_streams - 1])
    out = epts_mod._mix(layer, 0, ctx, moved, masks, lora, cfg, torch.Generator().manual_seed(1))
    for k in range(n_streams - 1):
        assert torch.equal(out[k], base[k])
    assert not torch.allclose(out[-1], base[-1])
    # the single-stream (EPTS) mix of the same paths on stream 0 = the weighted sum of each path's output
    mixed = EPTSConfig(epochs=1, batch_size=2)
    single = epts_mod._mix(layer, 0, ctx, x, masks, lora, mixed, torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)
    bw = epts_mod._BlockWeights(layer, 0, masks, lora, "masked")
    want = sum(w * epts_mod._forward(layer, ctx, bw.params(p, p.stratified(1, gen)[0]), x)
               for p, w in zip(epts_mod._paths(mixed), mixed.mixing_weights()))
    torch.testing.assert_close(single, want, rtol=1e-5, atol=1e-5)


def test_cli_compress_and_eval_tiers(tiny_model_dir, calib_file, tmp_path, capsys):
    out = tmp_path / "el"
    assert main(["compress", "--model", str(tiny_model_dir), "--out", str(out), "--calib", str(calib_file),
                 "--calib-samples", "4", "--calib-seq-len", "32", "--epochs", "1", "--tiers", "dense,50%,2:4",
                 "--device", "cpu"]) == 0
    assert main(["eval-ppl", "--model", str(out), "--tier", "all", "--data", str(calib_file),
                 "--seq-len", "64"]) == 0
    table = capsys.readouterr().out
    assert "   50%    0.5" in table and "   2:4    0.5000" in table
    base = tmp_path / "wanda"
    assert main(["compress", "--model", str(tiny_model_dir), "--out", str(base), "--method", "wanda",
                 "--calib", str(calib_file), "--calib-samples", "4", "--calib-seq-len", "32",
                 "--tiers", "50%,2:4"]) == 0
    assert (base / "50pct" / "model.safetensors").is_file() and (base / "2-4" / "model.safetensors").is_file()


@pytest.mark.parametrize("args, msg", [
    (["--tiers", "dense,55.5%"], "expected a whole percent"),
    (["--calib", "/nonexistent/file"], "is not 'stdlib'"),
    (["--epochs", "1", "--lora-mode", "masked", "--tiers", "3:8"], "is not 'dense', '<n>%' or one of 2:4"),
])
def test_cli_compress_bad_input(tiny_model_dir, tmp_path, args, msg, capsys):
    with pytest.raises(SystemExit) as e:
        main(["compress", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), *args])
    assert e.value.code == 2 and msg in capsys.readouterr().err
