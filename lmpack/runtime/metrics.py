"""Prometheus metrics for one server: requests by route and status, latency, tokens, queue depth.

Each app gets its own registry (no process-global state, so tests can start several servers).
prometheus_client is optional on the air-gapped host: without it the metrics are no-ops and /metrics
answers 404 saying why.

Beside lmpack's own names, the generation metrics dashboards and routers already read are kept under vLLM's
names (`vllm:...`, labelled `model_name`): its Grafana dashboards and the Kubernetes Gateway API inference
extension's endpoint picker (queue and KV cache usage) then work unchanged. docs/serving.md "Metrics" maps them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256)
# vLLM's buckets for inter-token latency, so its dashboards' quantiles read the same
_TOKEN_GAP_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
# vLLM's finished_reason values: a cancelled generation (the client left) is its "abort"
_VLLM_REASONS = {"stop": "stop", "length": "length", "cancelled": "abort"}


class Metrics:
    def __init__(
        self,
        *,
        queue_depth: Callable[[], float],
        active: Callable[[], float],
        cache: Any = None,
        model_name: str = "",
        kv_usage: Callable[[], float] = lambda: 0.0,
        prefix_cache: Any = None,
    ):
        """`cache`, a ResponseCache or None, is read by the size gauges at each scrape; `kv_usage` is the share
        of the server's generation slots in use (lmpack has no paged KV pool whose blocks it could count)."""
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
        self.cancelled = prom.Counter(
            "lmpack_cancelled_requests", "Generations ended because the client went away", registry=r
        )
        self._vllm(prom, r, model_name, queue_depth=queue_depth, active=active, kv_usage=kv_usage)
        if prefix_cache is not None:
            r.register(_PrefixCacheCollector(prefix_cache, model_name))
        if cache is not None:
            prom.Gauge("lmpack_response_cache_entries", "Answers held by the response cache", registry=r).set_function(
                lambda: cache.entries
            )
            prom.Gauge("lmpack_response_cache_bytes", "Bytes charged to the response cache", registry=r).set_function(
                lambda: cache.bytes
            )

    def _vllm(self, prom: Any, r: Any, model: str, *, queue_depth: Callable, active: Callable, kv_usage: Callable):
        labels = {"model_name": model}

        def gauge(name: str, what: str, read: Callable[[], float]) -> None:
            prom.Gauge(name, what, ["model_name"], registry=r).labels(**labels).set_function(read)

        def histogram(name: str, what: str, buckets: Sequence[float]) -> Any:
            return prom.Histogram(name, what, ["model_name"], buckets=buckets, registry=r).labels(**labels)

        def counter(name: str, what: str) -> Any:
            return prom.Counter(name, what, ["model_name"], registry=r).labels(**labels)

        gauge("vllm:num_requests_running", "Generations running now", active)
        gauge("vllm:num_requests_waiting", "Requests waiting for a generation slot", queue_depth)
        gauge(
            "vllm:kv_cache_usage_perc",
            "Share of generation slots in use, 0 to 1 (lmpack's KV caches are per slot)",
            kv_usage,
        )
        self.v_first_token = histogram(
            "vllm:time_to_first_token_seconds", "From arrival to the first token, waiting included", _LATENCY_BUCKETS
        )
        self.v_token_gap = histogram("vllm:inter_token_latency_seconds", "Between two tokens", _TOKEN_GAP_BUCKETS)
        self.v_e2e = histogram("vllm:e2e_request_latency_seconds", "From arrival to the last token", _LATENCY_BUCKETS)
        self.v_prompt = counter("vllm:prompt_tokens", "Prompt tokens processed")
        self.v_generated = counter("vllm:generation_tokens", "Completion tokens generated")
        self.v_finished = prom.Counter(
            "vllm:request_success", "Generations finished, by reason", ["model_name", "finished_reason"], registry=r
        )
        self._model = model

    @property
    def enabled(self) -> bool:
        return self.registry is not None

    def request(self, route: str, code: int, seconds: float) -> None:
        if self.enabled:
            self.requests.labels(route=route, code=str(code)).inc()
            self.latency.labels(route=route).observe(seconds)

    def generation(
        self,
        *,
        reason: str | None,
        prompt_tokens: int,
        completion_tokens: int,
        first_token_seconds: float | None,
        token_gaps: Sequence[float],
        seconds: float,
    ) -> None:
        """One generation's end, however it ended (a cancelled one counts what it generated)."""
        if not self.enabled:
            return
        self.prompt_tokens.inc(prompt_tokens)
        self.generated_tokens.inc(completion_tokens)
        self.v_prompt.inc(prompt_tokens)
        self.v_generated.inc(completion_tokens)
        if reason == "cancelled":
            self.cancelled.inc()
        self.v_finished.labels(model_name=self._model, finished_reason=_VLLM_REASONS.get(reason or "", "error")).inc()
        if first_token_seconds is not None:
            self.v_first_token.observe(first_token_seconds)
        for gap in token_gaps:
            self.v_token_gap.observe(gap)
        self.v_e2e.observe(seconds)

    def embedded(self, prompt_tokens: int) -> None:
        if self.enabled:
            self.prompt_tokens.inc(prompt_tokens)

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


class _PrefixCacheCollector:
    """The prefix cache's counts as Prometheus reads them at each scrape (the cache keeps the numbers itself)."""

    def __init__(self, cache: Any, model: str):
        self.cache, self.model = cache, model

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        cache = self.cache
        counters = (
            ("lmpack_prefix_cache_hits", "Prompts that found a cached prefix", cache.hits, None),
            ("lmpack_prefix_cache_misses", "Prompts that found none", cache.misses, None),
            ("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache", cache.queried_tokens, True),
            ("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache", cache.hit_tokens, True),
        )
        for name, what, value, labelled in counters:
            family = CounterMetricFamily(name, what, labels=["model_name"] if labelled else None)
            family.add_metric([self.model] if labelled else [], value)
            yield family
        yield GaugeMetricFamily(
            "lmpack_prefix_cache_bytes", "Bytes of KV rows the prefix cache holds", value=cache.bytes
        )
        yield GaugeMetricFamily(
            "lmpack_prefix_cache_entries", "Prompts' prefixes the prefix cache holds", value=cache.entries
        )
