"""Where alert events go: JSON log lines, an HTTP webhook, syslog.

Delivery runs on one background thread behind a bounded queue, so a slow webhook (timeouts, retries)
never delays the liveness probes. A webhook is retried a bounded number of times with a short
back-off; an event that still cannot be delivered is logged and dropped.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import queue
import socket
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any, Protocol, TextIO

from lmpack.agent.config import NotifierSpec

log = logging.getLogger("lmpack.agent")


class Notifier(Protocol):
    def send(self, event: dict[str, Any]) -> None:
        """Deliver one event; raise OSError (one line: what failed and why) when it cannot be delivered."""

    def problem(self) -> str | None:
        """Why events could not be delivered now (checked at start-up), or None."""


class LogNotifier:
    """One JSON document a line, on stderr by default (journald and log shippers read that)."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream

    def send(self, event: dict[str, Any]) -> None:
        stream = self.stream or sys.stderr
        stream.write(json.dumps({"event": "alert", **event}, sort_keys=True) + "\n")
        stream.flush()

    def problem(self) -> str | None:
        return None


class WebhookNotifier:
    """POST the event as JSON; retried `retries` times on errors and non-2xx answers."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 5.0,
        retries: int = 3,
        backoff: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.url, self.timeout, self.retries, self.backoff, self._sleep = url, timeout, retries, backoff, sleep

    def send(self, event: dict[str, Any]) -> None:
        body = json.dumps(event, sort_keys=True).encode()
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(
                self.url, data=body, method="POST", headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    response.read(65536)
                return
            except (OSError, ValueError) as exc:  # HTTPError (non-2xx) is an OSError too
                error = exc
            if attempt < self.retries:
                self._sleep(self.backoff * 2**attempt)
        raise OSError(f"webhook {self.url} failed after {self.retries + 1} attempts: {error}")

    def problem(self) -> str | None:
        """Only the URL's form: the receiver may well start after the agent."""
        scheme = urllib.parse.urlsplit(self.url).scheme
        return None if scheme in ("http", "https") else f"webhook URL {self.url!r} is not http:// or https://"


def syslog_message(event: dict[str, Any]) -> str:
    return f"lmpack-agent: {json.dumps({'event': 'alert', **event}, sort_keys=True)}"


class _SysLogHandler(logging.handlers.SysLogHandler):
    def handleError(self, record: logging.LogRecord) -> None:
        """Raise the failure (the dispatcher logs it in one line) instead of printing logging's traceback."""
        raise  # called from SysLogHandler.emit's except clause, with the error in flight


class SyslogNotifier:
    """Through the local syslog socket; critical alerts at LOG_CRIT, warnings at LOG_WARNING."""

    # looked up with the event's severity, which an event may lack
    _LEVELS: dict[str | None, int] = {"critical": logging.CRITICAL, "warning": logging.WARNING, "info": logging.INFO}

    def __init__(self, address: str = "/dev/log"):
        self.address = address
        self.handler = _SysLogHandler(address=address)

    def problem(self) -> str | None:
        """The socket must exist and take a connection (a host without a syslog daemon has no /dev/log)."""
        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
            with socket.socket(socket.AF_UNIX, kind) as probe:
                try:
                    probe.connect(self.address)
                    return None
                except OSError as exc:
                    error = exc
        return f"syslog socket {self.address} cannot be reached: {error.strerror or error}"

    def send(self, event: dict[str, Any]) -> None:
        record = logging.LogRecord(
            "lmpack.agent",
            self._LEVELS.get(event.get("severity"), logging.WARNING),
            __file__,
            0,
            syslog_message(event),
            None,
            None,
        )
        try:
            self.handler.emit(record)
        except OSError as exc:
            raise OSError(f"syslog socket {self.address}: {exc.strerror or exc}") from None


def make_notifier(spec: NotifierSpec) -> Notifier:
    if spec.type == "webhook":
        assert spec.url is not None  # the config reader requires 'url' for a webhook notifier
        return WebhookNotifier(spec.url, timeout=spec.timeout, retries=spec.retries)
    if spec.type == "syslog":
        return SyslogNotifier(spec.address)
    return LogNotifier()


class Dispatcher:
    """Hands each event to every notifier on a background thread."""

    def __init__(self, notifiers: list[Notifier], *, capacity: int = 1000):
        self.notifiers = notifiers
        self._queue: queue.Queue = queue.Queue(maxsize=capacity)
        self._thread = threading.Thread(target=self._run, name="lmpack-agent-notify", daemon=True)
        self._thread.start()

    def publish(self, event: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            log.error("alert queue full; dropped %s %s", event.get("alert"), event.get("state"))

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued (within `timeout`), then stop."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            event = self._queue.get()
            if event is None:
                return
            for notifier in self.notifiers:
                try:
                    notifier.send(event)
                except Exception as exc:
                    log.error(
                        "could not deliver alert %s (%s) through %s: %s",
                        event.get("alert"),
                        event.get("state"),
                        type(notifier).__name__,
                        exc,
                    )
