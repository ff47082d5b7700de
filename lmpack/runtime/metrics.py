"""Prometheus metrics for one server: requests by route and status, latency, tokens, queue depth.

Each app gets its own registry (no process-global state, so tests can start several servers).
prometheus_client is optional on the air-gapped host: without it the metrics are no-ops and /metrics
answers 404 saying why.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256)


class Metrics:
    def __init__(self, *, queue_depth: Callable[[], float], active: Callable[[], float], cache: Any = None):
        """`cache`, a ResponseCache or None, is read by the size gauges at each scrape."""
        try:
            import prometheus_client as prom
        except ImportError:
            self.registry = None
            return
        self._prom = prom
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.requests = prom.Counter(
            "lmpack_requests", "HTTP requests by route and status code", ["route", "code"], registry=r
        )
        self.latency = prom.Histogram(
            "lmpack_request_duration_seconds",
            "Time from request to the end of the response",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.first_token = prom.Histogram(
            "lmpack_time_to_first_token_seconds",
            "Time from admission to the first generated text (streaming)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = prom.Counter("lmpack_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generated_tokens = prom.Counter("lmpack_generated_tokens", "Completion tokens generated", registry=r)
        self.batch_sizes = prom.Histogram(
            "lmpack_batch_size", "Sequences in each batched decode step", buckets=_BATCH_BUCKETS, registry=r
        )
        self.rejected = prom.Counter("lmpack_rejected_requests", "Requests refused for overload (429)", registry=r)
        prom.Gauge("lmpack_active_generations", "Generations running now", registry=r).set_function(active)
        prom.Gauge("lmpack_queued_requests", "Requests waiting for a generation slot", registry=r).set_function(
            queue_depth
        )
        self.cache_hits = prom.Counter(
            "lmpack_response_cache_hits", "Answers replayed from the response cache", registry=r
        )
        self.cache_misses = prom.Counter(
            "lmpack_response_cache_misses", "Cacheable requests that were not in the response cache", registry=r
        )
        if cache is not None:
            prom.Gauge("lmpack_response_cache_entries", "Answers held by the response cache", registry=r).set_function(
                lambda: cache.entries
            )
            prom.Gauge("lmpack_response_cache_bytes", "Bytes charged to the response cache", registry=r).set_function(
                lambda: cache.bytes
            )

    @property
    def enabled(self) -> bool:
        return self.registry is not None

    def request(self, route: str, code: int, seconds: float) -> None:
        if self.enabled:
            self.requests.labels(route=route, code=str(code)).inc()
            self.latency.labels(route=route).observe(seconds)

    def tokens(self, prompt: int, completion: int) -> None:
        if self.enabled:
            self.prompt_tokens.inc(prompt)
            self.generated_tokens.inc(completion)

    def time_to_first_token(self, seconds: float) -> None:
        if self.enabled:
            self.first_token.observe(seconds)

    def batch_step(self, size: int) -> None:
        if self.enabled:
            self.batch_sizes.observe(size)

    def overloaded(self) -> None:
        if self.enabled:
            self.rejected.inc()

    def cache_lookup(self, hit: bool) -> None:
        if self.enabled:
            (self.cache_hits if hit else self.cache_misses).inc()

    def render(self) -> tuple[bytes, str]:
        assert self.registry is not None  # only called when enabled (/metrics answers 404 otherwise)
        return self._prom.generate_latest(self.registry), self._prom.CONTENT_TYPE_LATEST
