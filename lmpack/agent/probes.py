"""HTTP probes of the server's /health/live and /health/ready.

The standard library's client, with a hard timeout: a stopped (SIGSTOP) or wedged server accepts the
TCP connection in the kernel but never answers, and that must count as a miss, not hang the agent.
"""

from __future__ import annotations

import json
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
    state: str | None = None  # the body's "status" (ready, starting, failed, draining) when it is JSON


def _state(body: bytes) -> str | None:
    try:
        document = json.loads(body)
    except ValueError:
        return None
    return document.get("status") if isinstance(document, dict) else None


def probe(url: str, *, timeout: float) -> ProbeResult:
    """GET url; ok only for a 2xx answer within `timeout` seconds."""
    started = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = response.read(4096)
            status = response.status
    except urllib.error.HTTPError as exc:
        try:
            body = exc.read(4096)
        except OSError:
            body = b""
        finally:
            exc.close()
        return ProbeResult(False, exc.code, time.monotonic() - started, f"HTTP {exc.code}", _state(body))
    except (OSError, ValueError) as exc:  # refused, reset, timed out
        return ProbeResult(False, None, time.monotonic() - started, f"{type(exc).__name__}: {exc}")
    return ProbeResult(200 <= status < 300, status, time.monotonic() - started, state=_state(body))


def live(base_url: str, *, timeout: float) -> ProbeResult:
    return probe(f"{base_url}/health/live", timeout=timeout)


def ready(base_url: str, *, timeout: float) -> ProbeResult:
    return probe(f"{base_url}/health/ready", timeout=timeout)
