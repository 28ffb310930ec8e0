"""TierBuilder: on-demand tiers built on their own thread, so a tier build never stalls decoding.

A tier that is not materialized (an unlisted percent such as "47%", or one evicted from the cache) is built
by `ElasticModel.build_tier`, which only reads the base weights and the maps; on a CPU that takes from tens of
milliseconds (the embedded model) to seconds (larger ones). Built on the model thread, every request in
flight would wait for it (measured before this module: 39 -> 238 ms per token for a concurrent request while
other clients asked for distinct unlisted tiers). Here the model thread only ever installs a finished build
(a few dict stores) and its requests wait in the queue until their tier is ready (scheduler `ready`).

Bounded: one build at a time, in request order; the on-demand cache holds `cache_tiers` tiers, and a tier
that a live request or the policy's current auto tier uses is never evicted, so when the cache is full of
tiers in use a new build waits until one is released (its requests wait in the bounded queue, 429 beyond).
A build that fails fails the requests waiting for that tier, with its error, and nothing else.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

import torch

from .elastic import ElasticModel

log = logging.getLogger("sparsedial.engine")


class TierBuilder:
    """Builds tiers requested with `request(name)` on a daemon thread; shares the engine's condition."""

    def __init__(self, em: ElasticModel, cond: threading.Condition, in_use: Callable[[], set[str]],
                 on_failed: Callable[[str, str], None], threads: int | None = 1) -> None:
        """`in_use()` (called under `cond`) names the tiers that must not be evicted; `on_failed(tier,
        message)` (under `cond`) fails the requests that wait for a tier whose build raised."""
        self.em, self._cond, self._in_use, self._on_failed, self._threads = em, cond, in_use, on_failed, threads
        self._queue: deque[str] = deque()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.builds = 0  # tiers built so far (tests and stats)

    def request(self, name: str) -> None:
        """Queue a build of `name` unless it is ready or already queued. Call under the condition."""
        if self.em.is_ready(name) or name in self._queue:
            return
        self._queue.append(name)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sparsedial-tier-builder", daemon=True)
            self._thread.start()
        self._cond.notify_all()

    @property
    def pending(self) -> list[str]:
        return list(self._queue)

    def stop(self, timeout: float | None = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        if self._threads and self.em.model.lm_head.weight.device.type == "cpu":
            torch.set_num_threads(self._threads)  # as the model thread: no OpenMP team fighting it for cores
        while True:
            name = self._next()
            if name is None:
                return
            try:
                built = self.em.build_tier(name)  # the slow part, outside the lock
            except Exception as e:  # noqa: BLE001 - a bad tier fails its own requests only
                log.warning("building tier %s failed: %s: %s", name, type(e).__name__, e)
                with self._cond:
                    self._queue.popleft()
                    self._on_failed(name, f"building tier {name} failed: {type(e).__name__}: {e}")
                    self._cond.notify_all()
                continue
            with self._cond:
                self.em.install_tier(built)
                self.builds += 1
                self._queue.popleft()
                self._cond.notify_all()

    def _next(self) -> str | None:
        """The next tier to build once the cache has room for it (None when stopping)."""
        with self._cond:
            while True:
                if self._stopping:
                    return None
                if self._queue:
                    name = self._queue[0]
                    in_use = self._in_use()
                    if self.em.is_ready(name) or name not in in_use:  # built meanwhile, or nobody wants it now
                        self._queue.popleft()
                        continue
                    if self.em.make_room(in_use):
                        return name
                self._cond.wait(timeout=1.0)  # woken by requests, finishes and installs
