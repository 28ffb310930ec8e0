"""benchmarks/bench_engine_gpu.py --smoke: the GPU engine benchmark's whole code path on a CPU (tiny random
Llama, synthetic elastic checkpoint, torch backend, transformers reference), so its first GPU run does not
crash on something a CPU could have caught."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_engine_gpu.py"
TIERS = ("dense", "50%", "70%", "90%", "2:4")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_engine_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve the module's string annotations through sys.modules
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


def test_smoke_fills_every_tier(bench, tmp_path):
    res, text = bench.main(["--smoke", "--backends", "torch", "--work", str(tmp_path / "model"),
                            "--out", str(tmp_path / "out")])
    cols = ["batch 1", "batch 8", "batch 32", "ttft ms", "tier MiB"]
    for tier in TIERS:
        row = res.cells[("torch", tier)]
        assert all(isinstance(row[c], float) and row[c] >= 0 for c in cols), (tier, row)
        assert f"| torch {tier} |" in text
    hf = res.cells[("transformers generate()", "dense")]
    assert isinstance(hf["ttft ms"], float), hf  # its 2-token decode rates may be timing noise on a CPU
    table = (tmp_path / "out" / "bench_engine_gpu.md").read_text()
    assert "| torch 2:4 |" in table and "error" not in table.split("| torch dense |")[1]
    assert (tmp_path / "out" / "bench_engine_gpu.csv").read_text().count("\ntorch,") == len(TIERS) * len(cols)
    # a second run reuses the checkpoint in --work instead of writing it again
    stamp = (tmp_path / "model" / "model.safetensors").stat().st_mtime_ns
    bench.main(["--smoke", "--backends", "torch", "--tiers", "dense", "--batches", "1", "--no-hf",
                "--work", str(tmp_path / "model")])
    assert (tmp_path / "model" / "model.safetensors").stat().st_mtime_ns == stamp


def test_failures_and_budget_become_cells(bench):
    assert bench.measure(lambda: 1 / 0, bench.Budget.of(60)).startswith("error: ZeroDivisionError")
    assert bench.measure(lambda: 1.0, bench.Budget.of(0)) == bench.SKIPPED
    assert bench.fmt("error: x | y") == "error: x / y"  # a message cannot break the markdown table


def test_smoke_triton_backend_tokens_agree_with_torch(tmp_path):
    """The triton leg under Triton's CPU interpreter (a fresh process: the variable must be set before triton
    is imported): its tiers load packed and its greedy tokens are compared with the torch backend's."""
    pytest.importorskip("triton")
    import os
    import subprocess

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--backends", "torch,triton", "--tiers",
                          "dense,50%,2:4", "--batches", "1", "--no-hf", "--work", str(tmp_path / "model"),
                          "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(x for x in out.stdout.splitlines() if "triton vs torch backend" in x)
    assert all(f"{tier} 2/2" in line for tier in ("dense", "50%", "2:4")), line
