"""One source of defaults: EngineConfig's fields give the scheduler's, the server settings' and the CLI's
defaults and help; the modes are enums that parse from their strings with clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
from sparsedial.engine.api import PolicySpec
from sparsedial.engine.options import Backend, DType, EngineConfig, LoadSignal, PolicyMode, default_of, doc_of
from sparsedial.engine.policy import validate_policy
from sparsedial.engine.scheduler import SchedulerConfig
from sparsedial.server.settings import ServerSettings

from sparsedial.paths import default_model


def test_scheduler_and_server_defaults_are_the_engines(monkeypatch):
    for var in ("SPARSEDIAL_MAX_RUNNING", "SPARSEDIAL_MAX_WAITING", "SPARSEDIAL_DTYPE", "SPARSEDIAL_BACKEND",
                "SPARSEDIAL_DEVICE", "SPARSEDIAL_MODEL"):
        monkeypatch.delenv(var, raising=False)
    engine, server = EngineConfig(), ServerSettings()
    assert SchedulerConfig() == SchedulerConfig.of(engine)
    assert (server.max_running, server.max_waiting) == (engine.max_batch, engine.max_waiting) == (16, 256)
    assert (server.dtype, server.backend, server.device) == (engine.dtype, engine.backend, engine.device)
    assert server.model == engine.model == default_model()
    assert ServerSettings.model_fields["dtype"].description == doc_of("dtype")
    assert default_of("policy") == PolicySpec()


def test_modes_parse_from_strings_with_clear_errors():
    cfg = EngineConfig(backend="torch", dtype="bfloat16")
    assert cfg.backend is Backend.TORCH and cfg.dtype is DType.BFLOAT16 and cfg.backend == "torch"
    with pytest.raises(ValueError, match="backend must be auto, torch or triton, got 'cuda'"):
        EngineConfig(backend="cuda")
    with pytest.raises(ValueError, match="dtype must be auto, float32, float16 or bfloat16, got 'fp8'"):
        EngineConfig(dtype="fp8")
    resolve = {"dense": None}.get  # never called for these: the mode is checked first
    with pytest.raises(ValueError, match="policy mode must be fixed or load, got 'sometimes'"):
        validate_policy(PolicySpec(mode="sometimes"), resolve)
    with pytest.raises(ValueError, match="policy signal must be requests or kv, got 'cpu'"):
        validate_policy(PolicySpec(signal="cpu"), resolve)
    assert PolicySpec().mode is PolicyMode.FIXED and PolicySpec().signal is LoadSignal.REQUESTS


def test_serve_help_shows_each_settings_description():
    out = subprocess.run([sys.executable, "-m", "sparsedial.cli", "serve", "--help"], capture_output=True,
                         text=True, check=True).stdout
    flat = " ".join(out.split())
    for name in ("dtype", "backend", "max_waiting"):
        assert " ".join(ServerSettings.model_fields[name].description.split()) in flat, name
    assert "SPARSEDIAL_MAX_RUNNING" in flat and "default 16" in flat
