"""HTTP probes of the server's /health/live and /health/ready.

The standard library's client, with a hard timeout: a stopped (SIGSTOP) or wedged server accepts the
TCP connection in the kernel but never answers, and that must count as a miss, not hang the agent.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from dataclasses import dataclass


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    status: int | None
    seconds: float
    error: str | None = None


def probe(url: str, *, timeout: float) -> ProbeResult:
    """GET url; ok only for a 2xx answer within `timeout` seconds."""
    started = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            response.read(4096)
            status = response.status
    except urllib.error.HTTPError as exc:
        exc.close()
        return ProbeResult(False, exc.code, time.monotonic() - started, f"HTTP {exc.code}")
    except (OSError, ValueError) as exc:  # refused, reset, timed out
        return ProbeResult(False, None, time.monotonic() - started, f"{type(exc).__name__}: {exc}")
    return ProbeResult(200 <= status < 300, status, time.monotonic() - started)


def live(base_url: str, *, timeout: float) -> ProbeResult:
    return probe(f"{base_url}/health/live", timeout=timeout)


def ready(base_url: str, *, timeout: float) -> ProbeResult:
    return probe(f"{base_url}/health/ready", timeout=timeout)
