"""Building and running the fleet: `build_app(options)` (a Serve Application), `app_builder(args)` (Serve config /
KubeRay entry point) and `run_local(options, host, port)` (`sparsedial serve --replicas N`)."""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Any

from .options import FleetOptions, require_ray
from .proxy_errors import CALLBACK as PROXY_CALLBACK
from .proxy_errors import ENV_VAR as PROXY_ENV_VAR

APP_NAME = "sparsedial"


def server_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """ServerSettings(**overrides) validated here (env vars included), as plain values every replica can
    rebuild it from (secrets in clear: they travel in the Serve deployment's arguments)."""
    from pydantic import SecretStr

    from sparsedial.server import ServerSettings

    settings = ServerSettings(**overrides)
    out: dict[str, Any] = {}
    for name in type(settings).model_fields:
        v = getattr(settings, name)
        if v is None or name in ("host", "port"):  # host / port are Serve's HTTP proxy's
            continue
        if isinstance(v, SecretStr):
            v = v.get_secret_value()
        elif isinstance(v, Enum):
            v = v.value
        elif isinstance(v, Path):
            v = str(v)
        out[name] = v
    return out


def build_app(options: FleetOptions):
    """The Serve application: FleetController + EngineReplica (the HTTP ingress) with `options`."""
    require_ray()
    from .serve_app import EngineReplica, FleetController

    controller = FleetController.bind(options.stale_s)
    return EngineReplica.options(**options.deployment_options()).bind(options.to_dict(), controller)


def app_builder(args: dict[str, Any]):
    """Serve's application builder (`import_path: sparsedial.deploy:app_builder`, `args:` the FleetOptions
    fields; `server:` ServerSettings overrides, SPARSEDIAL_* env vars of the pods apply too)."""
    options = FleetOptions.from_dict(dict(args or {}))
    options.server = server_overrides(options.server)
    return build_app(options)


def start_local_cluster(options: FleetOptions, host: str = "127.0.0.1", port: int = 8000) -> None:
    """A new local Ray cluster on loopback (no dashboard, small object store) and Serve's HTTP proxy on
    host:port."""
    require_ray()
    import ray
    from ray import serve

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Serve's router probes replica queue lengths with a 0.1 s deadline: on a busy small machine that only logs
    # warnings (the fleet controller answers in ~1 ms, but its event loop shares the cores)
    os.environ.setdefault("RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "1.0")
    # Serve's proxies answer a request whose replica died in sparsedial's JSON error shape (proxy_errors.py);
    # read by each proxy actor at start, which inherits this process's environment (a local cluster)
    os.environ.setdefault(PROXY_ENV_VAR, PROXY_CALLBACK)
    most = options.max_replicas if options.autoscale else options.replicas
    cpus = max(os.cpu_count() or 1, math.ceil(most * options.replica_cpus))
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=cpus,
             object_store_memory=200 * 2**20, log_to_driver=True,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": str(options.torch_threads)}})
    serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})


def deploy(options: FleetOptions, blocking: bool = False):
    """serve.run the app on the connected Ray cluster (returns when every replica is up)."""
    from ray import serve

    return serve.run(build_app(options), name=APP_NAME, route_prefix="/", blocking=blocking)


def run_local(options: FleetOptions, host: str = "127.0.0.1", port: int = 8000) -> int:
    """`sparsedial serve --replicas N`: start the cluster and the app, serve until Ctrl-C."""
    import ray
    from ray import serve

    def _stop(signum, frame):  # SIGTERM (a supervisor, docker stop) shuts down like Ctrl-C
        raise KeyboardInterrupt

    start_local_cluster(options, host, port)
    signal.signal(signal.SIGTERM, _stop)  # after ray.init, which installs its own
    try:
        deploy(options)
        n = f"{options.min_replicas}..{options.max_replicas} (autoscaling)" if options.autoscale else options.replicas
        print(f"sparsedial: {n} replicas on Ray Serve at http://{host}:{port} (Ctrl-C stops)", file=sys.stderr)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
