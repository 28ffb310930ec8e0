"""Scale-out on Ray Serve: N engine replicas (the same elastic checkpoint) behind sparsedial's HTTP API, with
the tier policy evaluated on the fleet's load (docs/deploy.md).

`ray[serve]` is an optional extra (`pip install 'sparsedial[ray]'`); importing this package does not import
ray. `build_app(FleetOptions(...))` returns the Serve application, `app_builder(args)` is the entry point of a
Serve config / KubeRay RayService (`import_path: sparsedial.deploy:app_builder`), `run_local(options)` starts
a loopback Ray cluster and serves the app (`sparsedial serve --replicas N`).
"""

from __future__ import annotations

from typing import Any

from .options import FleetOptions, RayMissingError, require_ray

__all__ = ["FleetOptions", "RayMissingError", "app_builder", "build_app", "require_ray", "run_local"]


def __getattr__(name: str) -> Any:
    if name in ("build_app", "app_builder", "run_local"):
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module 'sparsedial.deploy' has no attribute {name!r}")
