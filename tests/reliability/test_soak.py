"""A bounded soak of the real server (benchmarks/soak.py): 64 concurrent clients mixing valid, victim and
invalid requests plus an admin loop flipping the default tier, on the real engine over real uvicorn.

The report must have no violations (no 5xx, no hang, no valid request refused, no invalid one accepted, no
victim whose tokens changed, every error body in OpenAI's shape), and every category must actually have
happened, so the test cannot pass by sending nothing. SPARSEDIAL_SOAK_S sets the short soak's length.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from .conftest import ADMIN_TOKEN

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"


def _load_soak():
    spec = importlib.util.spec_from_file_location("sparsedial_soak", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


soak = _load_soak()


def run_and_check(serve, seconds: float):
    srv = serve()
    report = soak.run_soak(srv.url, ADMIN_TOKEN, seconds, clients=64, seed=0)
    print(report.markdown())
    assert report.ok, f"{report.n_violations} violations:\n" + "\n".join(report.violations)
    assert report.total("valid", 200) > 0 and report.total("victim", 200) > 0
    assert report.total("admin", 200) > 0
    assert report.total(status="disconnected") > 0
    seen = {case for kind, case, _ in report.counts if kind == "invalid"}
    expected = {case for case, *_ in soak.invalid_cases("m")}
    assert seen == expected, f"invalid cases never sent: {sorted(expected - seen)}"
    victims = {case for kind, case, _ in report.counts if kind == "victim"}
    assert victims == {f"tier {t}" for t in soak.VICTIM_TIERS}, victims
    return report


def test_short_soak(serve):
    run_and_check(serve, float(os.environ.get("SPARSEDIAL_SOAK_S", "15")))


@pytest.mark.slow
def test_long_soak(serve):
    run_and_check(serve, 60.0)
