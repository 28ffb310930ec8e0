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
