"""`sparsedial generate --sparsity` on an elastic checkpoint and on a plain model."""

from __future__ import annotations

import pytest

from sparsedial.cli import main


def test_generate_at_a_tier(elastic_dir, capsys):
    assert main(["generate", "--model", str(elastic_dir), "--prompt", "def main():", "--max-tokens", "6",
                 "--temperature", "0", "--sparsity", "0.45"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("def main():") and "generated, finish: length, tier: 45%]" in out.err


def test_plain_model_serves_dense_only(capsys):
    assert main(["generate", "--prompt", "x", "--max-tokens", "2", "--sparsity", "dense"]) == 0
    assert "tier: dense]" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["generate", "--prompt", "x", "--sparsity", "30%"])
    assert e.value.code == 2
    assert "unknown sparsity tier '30%'; available: dense, auto" in capsys.readouterr().err
