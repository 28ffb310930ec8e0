"""`LiveServer`: a sparsedial app served by real uvicorn on a free loopback port, in a background thread.

For tests, notebooks and programs that embed the server: `with LiveServer(create_app(settings, engine)) as s:
httpx.get(s.url + "/health")`. The engine (if given to create_app) is the caller's to shut down.
"""

from __future__ import annotations

import threading
import time

import uvicorn


class LiveServer:
    """uvicorn serving `app` on `host` (port 0 = a free port) in a daemon thread."""

    def __init__(self, app, engine=None, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        self.app, self.engine = app, engine
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                                timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)

    def start(self, timeout: float = 20.0) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
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

    def stop(self, timeout: float = 15.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=timeout)
        if self.thread.is_alive():
            raise RuntimeError("uvicorn thread did not stop")

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
