"""A real uvicorn server on a free loopback port, in a thread, shut down after each test."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
import uvicorn
from fake_engine import FakeEngine
from sparsedial.server import ServerSettings, create_app

ADMIN_TOKEN = "test-admin-token"


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1 (port 0 = a free port) in a background thread."""

    def __init__(self, app, engine=None) -> None:
        self.app, self.engine = app, engine
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        assert not self.thread.is_alive(), "uvicorn thread did not stop"


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
