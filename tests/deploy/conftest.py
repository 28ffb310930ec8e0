"""Fleet tests: a real 2-replica Ray Serve app on a local loopback cluster (started once for the folder's
integration tests: ~1 min on a busy 2-core machine), the embedded elastic model, 4 KV slots per replica, one
torch thread per replica. Skipped with a reason when ray[serve] is not installed (`make test-deploy`
installs it). The unit tests (test_fleet_unit.py) need no ray."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import httpx
import pytest

ADMIN_TOKEN = "fleet-admin-token"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MODEL = Path(__file__).resolve().parents[2] / "models" / "stdlib-tiny-elastic"
MODEL_NAME = MODEL.name
SLOTS = 4  # per replica
LADDER = ((6.0, "50%"), (10.0, "70%"))  # over the fleet's waiting + running (2 x 4 slots)
HYSTERESIS = 2.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Fleet:
    def __init__(self, url: str) -> None:
        self.url, self.auth, self.model = url, AUTH, MODEL_NAME
        self.http = httpx.Client(base_url=url, timeout=60)

    def view(self) -> dict:
        r = self.http.get("/admin/fleet", headers=AUTH)
        r.raise_for_status()
        return r.json()

    def wait(self, pred, timeout: float, what: str, every: float = 0.1) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            v = self.view()
            if pred(v):
                return v
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {v}")
            time.sleep(every)

    def idle(self, timeout: float = 30.0) -> dict:
        return self.wait(lambda v: len(v["replica_reports"]) == 2 and all(
            r["running"] + r["waiting"] == 0 for r in v["replica_reports"]), timeout, "an idle 2-replica fleet")

    def reset_policy(self) -> None:
        body = {"mode": "load", "default_tier": "dense", "hysteresis": HYSTERESIS,
                "ladder": [{"threshold": t, "tier": n} for t, n in LADDER]}
        r = self.http.put("/admin/tier", json=body, headers=AUTH)
        assert r.status_code == 200, r.text


@pytest.fixture(scope="session")
def fleet():
    pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install 'sparsedial[ray]'; "
                                            "make test-deploy)")
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")  # a shared test machine: no OOM killer
    os.environ.setdefault("RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "1.0")
    import ray
    from ray import serve

    from sparsedial.deploy import FleetOptions
    from sparsedial.deploy.app import deploy, server_overrides, start_local_cluster

    port = _free_port()
    opts = FleetOptions(replicas=2, replica_cpus=0.5, ladder=LADDER, hysteresis=HYSTERESIS, stale_s=1.5,
                        server=server_overrides({"model": MODEL, "device": "cpu", "max_running": SLOTS,
                                                 "admin_token": ADMIN_TOKEN}))
    start_local_cluster(opts, port=port)
    try:
        deploy(opts)
        f = Fleet(f"http://127.0.0.1:{port}")
        f.idle(60)
        yield f
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture
def clean(fleet):
    """The fleet idle with the suite's policy, before and after a test."""
    fleet.reset_policy()
    fleet.idle()
    yield fleet
    fleet.idle(60)
    fleet.reset_policy()
