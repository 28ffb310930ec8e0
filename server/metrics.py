"""Prometheus metrics, one `CollectorRegistry` per app (no module-level state): names follow vLLM's with
our `sparsedial_` prefix, a `model_name` label on every series (vLLM's dashboards filter on it), a `tier`
label wherever a request's tier is known, and `endpoint` = the route path (`/v1/completions`) everywhere."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from sparsedial.engine.api import EngineProtocol, FinishEvent

# Latency buckets (seconds) span a sub-millisecond CPU token to a long queued request.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    """The app's collectors. `observe_finish` records a finished request; `refresh` samples the engine's
    gauges right before each scrape."""

    def __init__(self, model_name: str = "") -> None:
        self.model_name = model_name  # set once the engine is loaded (ServerState.attach)
        self._tiers: dict[str, None] = {}  # tiers labelled on the tier gauges so far, in order
        r = self.registry = CollectorRegistry()
        self.requests = Counter("sparsedial_requests", "Finished requests by endpoint, tier and finish reason.",
                                ["model_name", "endpoint", "tier", "finish_reason"], registry=r)
        self.errors = Counter("sparsedial_request_errors", "Requests answered with an error, by endpoint and "
                              "HTTP status.", ["model_name", "endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("sparsedial_prompt_tokens", "Prompt tokens processed.", ["model_name", "tier"], registry=r)
        self.generation_tokens = Counter("sparsedial_generation_tokens", "Tokens generated.", ["model_name", "tier"],
                                         registry=r)
        self.ttft = self._hist("sparsedial_time_to_first_token_seconds", "Submit to first generated token.")
        self.itl = self._hist("sparsedial_inter_token_latency_seconds", "Gap between consecutive tokens.")
        self.e2e = self._hist("sparsedial_e2e_request_latency_seconds", "Submit to finish.")
        self.queue = self._hist("sparsedial_request_queue_time_seconds", "Submit to admission (waiting queue).")
        self.running = Gauge("sparsedial_num_requests_running", "Requests being decoded.", ["model_name"],
                             registry=r)
        self.waiting = Gauge("sparsedial_num_requests_waiting", "Requests waiting for a slot.", ["model_name"],
                             registry=r)
        self.kv_usage = Gauge("sparsedial_kv_cache_usage_ratio", "KV slots in use / total.", ["model_name"],
                              registry=r)
        self.default_tier = Gauge("sparsedial_default_tier", "1 for the operator's default tier.",
                                  ["model_name", "tier"], registry=r)
        self.auto_tier = Gauge("sparsedial_auto_tier", "1 for the tier `auto` requests get now.",
                               ["model_name", "tier"], registry=r)

    def _hist(self, name: str, doc: str) -> Histogram:
        return Histogram(name, doc, ["model_name", "tier"], buckets=_LATENCY_BUCKETS, registry=self.registry)

    def observe_finish(self, endpoint: str, ev: FinishEvent) -> None:
        m, t = self.model_name, ev.tier
        self.requests.labels(m, endpoint, t, ev.finish_reason).inc()
        self.prompt_tokens.labels(m, t).inc(ev.prompt_tokens)
        self.generation_tokens.labels(m, t).inc(ev.completion_tokens)
        self.e2e.labels(m, t).observe(ev.timings.e2e)
        self.queue.labels(m, t).observe(ev.timings.queue)
        if ev.timings.ttft is not None:
            self.ttft.labels(m, t).observe(ev.timings.ttft)
        for gap in ev.timings.inter_token:
            self.itl.labels(m, t).observe(gap)

    def observe_error(self, endpoint: str, status: int) -> None:
        self.errors.labels(self.model_name, endpoint, str(status)).inc()

    def refresh(self, engine: EngineProtocol) -> None:
        m, s = self.model_name, engine.stats()
        self.running.labels(m).set(s.running)
        self.waiting.labels(m).set(s.waiting)
        self.kv_usage.labels(m).set(s.kv_slots_used / s.kv_slots_total if s.kv_slots_total else 0.0)
        default = engine.get_policy().default_tier
        # every tier ever labelled: a default or auto tier the checkpoint does not list (e.g. 45%) gets its
        # series, and is set back to 0 once it no longer is
        self._tiers.update(dict.fromkeys([*engine.tiers, default, s.current_auto_tier]))
        for tier in self._tiers:
            self.default_tier.labels(m, tier).set(1.0 if tier == default else 0.0)
            self.auto_tier.labels(m, tier).set(1.0 if tier == s.current_auto_tier else 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
