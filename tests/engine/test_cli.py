"""`sparsedial generate --sparsity` on an elastic checkpoint and on a plain model."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparsedial.cli import DEFAULT_MODEL, main

PLAIN = Path(__file__).resolve().parents[2] / "models" / "stdlib-tiny"


def test_generate_at_a_tier(elastic_dir, capsys):
    assert main(["generate", "--model", str(elastic_dir), "--prompt", "def main():", "--max-tokens", "6",
                 "--temperature", "0", "--sparsity", "0.45"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("def main():") and "generated, finish: length, tier: 45%]" in out.err


def test_default_model_is_the_embedded_elastic_one(capsys):
    assert DEFAULT_MODEL.name == "stdlib-tiny-elastic"
    assert main(["generate", "--prompt", "x", "--max-tokens", "2", "--sparsity", "2:4", "--seed", "0"]) == 0
    assert "tier: 2:4]" in capsys.readouterr().err


def test_plain_model_serves_dense_only(capsys):
    assert main(["generate", "--model", str(PLAIN), "--prompt", "x", "--max-tokens", "2", "--sparsity", "dense"]) == 0
    assert "tier: dense]" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(PLAIN), "--prompt", "x", "--sparsity", "30%"])
    assert e.value.code == 2
    assert "unknown sparsity tier '30%'; available: dense, auto" in capsys.readouterr().err


def test_eval_ppl_tiers_on_a_plain_model_fails_before_loading(capsys, monkeypatch):
    """`--tier` on a model without elastic.json is refused at once (it used to load the model first)."""
    from sparsedial.engine import loader

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(loader, "load_model", no_load)
    plain = Path(__file__).resolve().parents[2] / "models" / "stdlib-tiny"
    with pytest.raises(SystemExit) as e:
        main(["eval-ppl", "--model", str(plain), "--tier", "all"])
    assert e.value.code == 2 and "not an elastic checkpoint" in capsys.readouterr().err


def test_generate_reads_model_and_device_from_the_environment(monkeypatch):
    from sparsedial.cli import build_parser

    monkeypatch.setenv("SPARSEDIAL_MODEL", "/somewhere/else")
    monkeypatch.setenv("SPARSEDIAL_DEVICE", "cpu")
    args = build_parser().parse_args(["generate", "--prompt", "x"])
    assert str(args.model) == "/somewhere/else" and args.device == "cpu" and args.temperature == 1.0
