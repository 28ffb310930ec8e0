"""Server tests run on the REAL engine (AsyncEngine on the embedded elastic model, CPU) behind real uvicorn on
a free loopback port. `real_engine` is loaded once for the whole folder (a load is a few seconds, much more
on a busy 2-core machine); `serve(**settings)` starts a server over it
(or over another engine: `serve(engine, ...)`, `serve(None, ...)` for an app that loads its own). After each
test the engine must be idle again (no request left running or waiting) and its policy is put back.
Failures are injected into the real engine (reference.py: `poisoned`), never faked.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sparsedial.server import ServerSettings, create_app
from sparsedial.server.live import LiveServer

ADMIN_TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MODELS = Path(__file__).resolve().parents[2] / "models"
REAL_MODEL = MODELS / "stdlib-tiny-elastic"
DENSE_MODEL = MODELS / "stdlib-tiny"  # the elastic model's base weights: a plain HF model (transformers reference)
SLOTS = 4  # KV slots (max_batch) of the shared engine
# Independent of the code under test: what the checkpoint's files say
MODEL_NAME = REAL_MODEL.name  # the engine serves the model under its directory's name
TIERS = [t["name"] for t in json.loads((REAL_MODEL / "elastic.json").read_text())["tiers"]]
CONTEXT = json.loads((REAL_MODEL / "config.json").read_text())["max_position_embeddings"]
_DEFAULT = object()


def make_engine(**overrides):
    """A fresh AsyncEngine on the embedded elastic model (CPU); `overrides` are EngineConfig fields."""
    from sparsedial.engine.async_engine import AsyncEngine
    from sparsedial.engine.runner import EngineConfig

    return AsyncEngine(EngineConfig(**{"model": REAL_MODEL, "device": "cpu", "max_batch": SLOTS, **overrides}))


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread in the test process (loading, transformers references): on a busy 2-core machine two
    OpenMP threads per process made the engine's load 4-20x slower (the model thread uses one already)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def real_engine():
    """The real AsyncEngine on the embedded model (CPU, 4 slots, every tier resident), loaded once; each test
    leaves it idle with its policy as it found it (`serve`)."""
    engine = make_engine()
    yield engine
    engine.shutdown()


@pytest.fixture
def engine(real_engine):
    return real_engine


def wait_until(pred: Callable[[], bool], timeout: float = 20.0, poll: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll)
    return True


def idle(engine) -> bool:
    s = engine.stats()
    return s.running == 0 and s.waiting == 0 and s.kv_slots_used == 0


@pytest.fixture
def serve(real_engine) -> Iterator[Callable[..., LiveServer]]:
    """`serve(engine=<the shared engine>, **settings)` starts a server; every one started is stopped at teardown,
    then the shared engine must be idle and gets its policy back (admin tests and default_tier change it)."""
    started: list[LiveServer] = []
    policy = real_engine.get_policy()

    def start(engine=_DEFAULT, **settings) -> LiveServer:
        engine = real_engine if engine is _DEFAULT else engine
        settings.setdefault("admin_token", ADMIN_TOKEN)
        settings.setdefault("model", REAL_MODEL)
        app = create_app(ServerSettings(**settings), engine=engine)
        srv = LiveServer(app, engine).start()
        started.append(srv)
        return srv

    try:
        yield start
    finally:
        for srv in started:
            srv.stop()
        left = wait_until(lambda: idle(real_engine), timeout=10)
        real_engine.set_policy(policy)
    assert left, f"requests left in the engine after the test: {real_engine.stats()}"


@pytest.fixture
def server(serve) -> LiveServer:
    return serve()


@pytest.fixture(autouse=True)
def _no_leftover_threads() -> Iterator[None]:
    yield
    leftover = [t.name for t in threading.enumerate() if t.name == "test-uvicorn" and t.is_alive()]
    assert not leftover, f"server threads left running: {leftover}"
