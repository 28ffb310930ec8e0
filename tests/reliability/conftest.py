"""The real engine on the embedded elastic model behind real uvicorn on loopback, for fault injection.

`engine` is loaded once per module (a few seconds); `serve(**settings)` starts a server over it per test.
`solo(body)` runs a request alone and returns its greedy token ids: the reference a victim's tokens are
compared with after it shared batches with a hostile request.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import httpx
import pytest
import torch
from sparsedial.server import ServerSettings, create_app
from sparsedial.server.live import LiveServer

MODELS = Path(__file__).resolve().parents[2] / "models"
MODEL = MODELS / "stdlib-tiny-elastic"
ADMIN_TOKEN = "reliability-admin"


def make_engine(**overrides):
    from sparsedial.engine.async_engine import AsyncEngine
    from sparsedial.engine.runner import EngineConfig

    cfg = {"model": MODEL, "device": "cpu", "max_batch": 4, "max_seq_len": 512, **overrides}
    return AsyncEngine(EngineConfig(**cfg))


@pytest.fixture(scope="module")
def engine():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # 2-core CI machines: the test process and the engine thread share them
    eng = make_engine()
    yield eng
    eng.shutdown()
    torch.set_num_threads(before)


@pytest.fixture
def serve(engine) -> Iterator[Callable[..., LiveServer]]:
    """`serve(engine=None, **settings)`: a live server (over the module's engine unless another is given)."""
    started: list[LiveServer] = []

    def start(eng=None, **settings) -> LiveServer:
        eng = eng or engine
        settings = {"model": MODEL, "admin_token": ADMIN_TOKEN, **settings}
        srv = LiveServer(create_app(ServerSettings(**settings), engine=eng), eng).start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture
def server(serve) -> LiveServer:
    return serve()


def sse_events(lines: Iterable[str]) -> Iterator[dict]:
    """The JSON events of a server-sent event stream, up to `data: [DONE]`."""
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


def token_ids(url: str, body: dict, timeout: float = 60.0,
              on_token: Callable[[int], None] | None = None) -> tuple[int, list[int], dict]:
    """POST /generate (streamed, so token ids come back); (status, token ids, final event or error body).
    `on_token(id)` is called as each token arrives."""
    ids: list[int] = []
    last: dict = {}
    with httpx.stream("POST", f"{url}/generate", json={**body, "stream": True}, timeout=timeout) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, [], r.json()
        for ev in sse_events(r.iter_lines()):
            if ev.get("type") == "token":
                ids.append(ev["token_id"])
                if on_token is not None:
                    on_token(ev["token_id"])
            else:
                last = ev
    return 200, ids, last


@pytest.fixture
def solo(server) -> Callable[[dict], list[int]]:
    """Greedy token ids of `body` run alone on an idle engine."""
    def run(body: dict) -> list[int]:
        status, ids, last = token_ids(server.url, body)
        assert status == 200 and last.get("finish_reason") in ("length", "stop"), last
        return ids
    return run
