"""Measurements: the host (psutil), the server process, the GPU (NVML, optional) and the server's /metrics.

Rates and latency percentiles come from the difference between two scrapes of the server's counters,
so they describe the last interval, not the server's whole life; a restarted server (counters back to
zero) starts a fresh window. Every value may be None when it cannot be known (no traffic, no GPU).
"""

from __future__ import annotations

import math
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

from lmpack.nvml import NvmlUnavailable, nvml, nvml_text, nvml_value

# Every name an alert rule may use, with the help text shown on the agent's /metrics.
METRICS: dict[str, str] = {
    "host_cpu_percent": "Host CPU use, all cores, percent",
    "host_memory_percent": "Host memory in use, percent",
    "host_disk_percent": "Disk in use where the releases live, percent",
    "server_up": "1 when the server process runs",
    "server_live": "1 when the last liveness probe passed",
    "server_ready": "1 when the last readiness probe passed",
    "server_restarts_total": "Restarts by the agent since it started",
    "server_restarts_15m": "Restarts by the agent in the last 15 minutes",
    "server_cpu_percent": "Server process CPU use, percent of one core",
    "server_rss_bytes": "Server process resident memory",
    "switch_failures_recent": "Failed version switches and automatic rollbacks within [switch] alert_window_seconds",
    "request_rate": "API requests per second over the last interval",
    "error_rate": "Fraction of API requests answered 5xx over the last interval",
    "rejected_rate": "429 answers per second over the last interval",
    "latency_p50_seconds": "Median API request latency over the last interval (from histogram buckets)",
    "latency_p95_seconds": "95th percentile API request latency over the last interval",
    "latency_p99_seconds": "99th percentile API request latency over the last interval",
    "queue_depth": "Requests waiting for a generation slot",
    "active_generations": "Generations running now",
    "gpu_utilization_percent": "GPU 0 utilisation, percent",
    "gpu_memory_percent": "GPU 0 memory in use, percent",
    "gpu_temperature_celsius": "GPU 0 temperature",
    "gpu_ecc_errors": "GPU 0 uncorrected ECC errors (volatile)",
}

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """The samples of a Prometheus text exposition: (name, labels, value); comments are skipped."""
    samples = []
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        if not match or line.startswith("#"):
            continue
        try:
            value = float(match.group(3))
        except ValueError:
            continue
        samples.append((match.group(1), dict(_LABEL.findall(match.group(2) or "")), value))
    return samples


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Estimate a quantile from cumulative bucket counts {upper bound: count}, as Prometheus does.

    Linear interpolation inside the bucket that holds the rank; a rank in the +Inf bucket answers the
    largest finite bound (the true value is only known to be above it).
    """
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


class ServerScrape:
    """Keeps the previous scrape of the server's counters to turn them into rates and percentiles."""

    def __init__(self, url: str, *, timeout: float = 2.0):
        self.url = url.rstrip("/") + "/metrics"
        self.timeout = timeout
        self._previous: tuple[float, dict[str, Any]] | None = None

    def sample(self) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(self.url, timeout=self.timeout) as response:
                text = response.read().decode("utf-8", "replace")
        except OSError:
            self._previous = None
            return {}
        now, totals = time.monotonic(), _totals(parse_prometheus(text))
        values: dict[str, Any] = {"queue_depth": totals["queued"], "active_generations": totals["active"]}
        previous, self._previous = self._previous, (now, totals)
        if previous is None:
            return values
        elapsed = now - previous[0]
        delta = {key: totals[key] - previous[1][key] for key in ("requests", "errors", "rejected")}
        if delta["requests"] < 0 or elapsed <= 0:  # the server restarted: its counters began again
            return values
        buckets = {bound: count - previous[1]["buckets"].get(bound, 0.0) for bound, count in totals["buckets"].items()}
        values.update(
            request_rate=delta["requests"] / elapsed,
            rejected_rate=delta["rejected"] / elapsed,
            error_rate=(delta["errors"] / delta["requests"]) if delta["requests"] else 0.0,
        )
        for q, name in ((0.5, "latency_p50_seconds"), (0.95, "latency_p95_seconds"), (0.99, "latency_p99_seconds")):
            values[name] = histogram_quantile(q, buckets)
        return values


def _totals(samples: list[tuple[str, dict[str, str], float]]) -> dict[str, Any]:
    """Sum the API routes (/v1/...) only: probes and scrapes are not traffic."""
    totals: dict[str, Any] = {
        "requests": 0.0,
        "errors": 0.0,
        "rejected": 0.0,
        "queued": None,
        "active": None,
        "buckets": {},
    }
    for name, labels, value in samples:
        api_route = labels.get("route", "").startswith("/v1/")
        if name == "lmpack_requests_total" and api_route:
            totals["requests"] += value
            if labels.get("code", "").startswith("5"):
                totals["errors"] += value
        elif name == "lmpack_rejected_requests_total":
            totals["rejected"] += value
        elif name == "lmpack_request_duration_seconds_bucket" and api_route:
            bound = float(labels["le"])
            totals["buckets"][bound] = totals["buckets"].get(bound, 0.0) + value
        elif name == "lmpack_queued_requests":
            totals["queued"] = value
        elif name == "lmpack_active_generations":
            totals["active"] = value
    return totals


class HostSampler:
    """psutil readings of the host and of one process; keeps psutil.Process so CPU percent has a baseline."""

    def __init__(self, disk_path: Path):
        import psutil

        self._psutil = psutil
        self.disk_path = disk_path
        self._process: psutil.Process | None = None
        psutil.cpu_percent(interval=None)  # the first call only sets the baseline

    def sample(self, pid: int | None) -> dict[str, Any]:
        psutil = self._psutil
        values: dict[str, Any] = {
            "host_cpu_percent": psutil.cpu_percent(interval=None),
            "host_memory_percent": psutil.virtual_memory().percent,
            "server_cpu_percent": None,
            "server_rss_bytes": None,
        }
        try:
            values["host_disk_percent"] = psutil.disk_usage(str(self.disk_path)).percent
        except OSError:
            values["host_disk_percent"] = None
        if pid is None:
            self._process = None
            return values
        try:
            if self._process is None or self._process.pid != pid:
                self._process = psutil.Process(pid)
                self._process.cpu_percent(interval=None)
            values["server_cpu_percent"] = self._process.cpu_percent(interval=None)
            values["server_rss_bytes"] = self._process.memory_info().rss
        except psutil.Error:
            self._process = None
        return values


def gpu_sample() -> dict[str, Any]:
    """GPU 0 through NVML: {"available": False, "reason": ...} where there is no driver, GPU or nvidia-ml-py.

    Each value is read on its own (nvml_value): a query the device does not answer is left out, the rest
    still reported. On a unified-memory GPU (Jetson) NVML has no memory figures; memory is then the host's,
    which the CPU metrics already carry."""
    try:
        with nvml() as pynvml:
            if pynvml.nvmlDeviceGetCount() < 1:
                return {"available": False, "reason": "NVML sees no GPU"}
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            name = nvml_value(pynvml.nvmlDeviceGetName, handle)
            memory = nvml_value(pynvml.nvmlDeviceGetMemoryInfo, handle)
            utilization = nvml_value(pynvml.nvmlDeviceGetUtilizationRates, handle)
            temperature = nvml_value(pynvml.nvmlDeviceGetTemperature, handle, pynvml.NVML_TEMPERATURE_GPU)
            ecc = nvml_value(
                pynvml.nvmlDeviceGetTotalEccErrors,
                handle,
                pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                pynvml.NVML_VOLATILE_ECC,
            )
            return {
                "available": True,
                "name": nvml_text(name) if name is not None else "GPU 0",
                "gpu_utilization_percent": None if utilization is None else float(utilization.gpu),
                "gpu_memory_percent": 100.0 * memory.used / memory.total if memory and memory.total else None,
                "gpu_temperature_celsius": None if temperature is None else float(temperature),
                "gpu_ecc_errors": None if ecc is None else float(ecc),
            }
    except NvmlUnavailable as exc:
        reason = "nvidia-ml-py (pynvml) is not installed" if exc.missing_package else f"NVML could not start: {exc}"
        return {"available": False, "reason": reason}
    except Exception as exc:
        return {"available": False, "reason": f"NVML failed: {exc}"}


def render_prometheus(values: dict[str, Any]) -> str:
    """The agent's own /metrics: one gauge per known metric that has a value."""
    lines = []
    for name, help_text in METRICS.items():
        value = values.get(name)
        if value is None:
            continue
        lines += [
            f"# HELP lmpack_agent_{name} {help_text}",
            f"# TYPE lmpack_agent_{name} gauge",
            f"lmpack_agent_{name} {float(value)!r}",
        ]
    return "\n".join(lines) + "\n"
