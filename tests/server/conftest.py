"""A real uvicorn server on a free loopback port, in a thread, shut down after each test."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fake_engine import FakeEngine
from sparsedial.server import ServerSettings, create_app
from sparsedial.server.live import LiveServer

ADMIN_TOKEN = "test-admin-token"
MODELS = Path(__file__).resolve().parents[2] / "models"
REAL_MODEL = MODELS / "stdlib-tiny-elastic" if (MODELS / "stdlib-tiny-elastic" / "elastic.json").is_file() \
    else MODELS / "stdlib-tiny"


@pytest.fixture(scope="module")
def real_engine():
    """The real AsyncEngine on the embedded model (CPU, 4 slots), loaded once per test module."""
    from sparsedial.engine.async_engine import AsyncEngine
    from sparsedial.engine.runner import EngineConfig

    engine = AsyncEngine(EngineConfig(model=REAL_MODEL, device="cpu", max_batch=4))
    yield engine
    engine.shutdown()


@pytest.fixture
def serve() -> Iterator[Callable[..., LiveServer]]:
    """`serve(engine, **settings)` starts a server; every server started is stopped at teardown."""
    started: list[LiveServer] = []

    def start(engine=None, **settings) -> LiveServer:
        settings.setdefault("admin_token", ADMIN_TOKEN)
        app = create_app(ServerSettings(**settings), engine=engine)
        srv = LiveServer(app, engine).start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def server(serve, engine) -> LiveServer:
    return serve(engine)


@pytest.fixture(autouse=True)
def _no_leftover_threads() -> Iterator[None]:
    yield
    leftover = [t.name for t in threading.enumerate() if t.name == "test-uvicorn" and t.is_alive()]
    assert not leftover, f"server threads left running: {leftover}"
