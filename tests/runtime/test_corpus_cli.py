"""The stdlib corpus splits and the command line."""

from __future__ import annotations

import subprocess
import sys

from sparsedial import corpus
from sparsedial.cli import main


def test_splits_are_disjoint_deterministic_and_cover_heldout_list():
    files = corpus.list_files()
    assert files == sorted(files) and len(files) > 300
    by_split = {s: {f for f in files if corpus.split_of(f) is s} for s in corpus.Split}
    assert sum(len(v) for v in by_split.values()) == len(files)
    assert "json/decoder.py" in by_split[corpus.Split.HELDOUT] and "argparse.py" in by_split[corpus.Split.HELDOUT]
    assert "random.py" in by_split[corpus.Split.VAL]
    assert not any("/test/" in f or f.startswith("test/") for f in files)
    heldout = corpus.load_split("heldout")
    assert corpus.corpus_sha256(heldout) == corpus.corpus_sha256(corpus.load_split("heldout"))


def test_cli_generate(capsys):
    assert main(["generate", "--prompt", "def main():", "--max-tokens", "8", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("def main():") and len(out) > len("def main():\n")


def test_cli_eval_ppl_on_a_file(tmp_path, capsys):
    f = tmp_path / "code.py"
    f.write_text((corpus.stdlib_root() / "bisect.py").read_text())
    assert main(["eval-ppl", "--data", str(f), "--seq-len", "128"]) == 0
    assert "perplexity" in capsys.readouterr().out


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sparsedial.cli", *args], capture_output=True, text=True)


def test_cli_bad_input_gives_one_line_and_exit_2(tmp_path):
    for args, msg in [
        (["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"], "model directory not found"),
        (["generate", "--prompt", "x", "--temperature", "-1"], "temperature must be in"),
        (["eval-ppl", "--data", str(tmp_path / "nothing")], "is neither 'heldout'"),
    ]:
        r = run_cli(*args)
        assert r.returncode == 2, r.stderr
        assert msg in r.stderr and "Traceback" not in r.stderr
