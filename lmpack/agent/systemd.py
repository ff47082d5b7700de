"""systemd integration: READY=1 once supervising, WATCHDOG=1 while the loop runs, STOPPING=1 on the way out.

The notify protocol is one datagram per state on the socket systemd names in NOTIFY_SOCKET (a path, or
an abstract name starting with '@'); no library is needed. Outside systemd every call does nothing.
"""

from __future__ import annotations

import socket
import time

from lmpack.config import paths


class SystemdNotifier:
    def __init__(self, socket_path: str | None = None, watchdog_seconds: float | None = None):
        self.socket_path = socket_path if socket_path is not None else paths.systemd_notify_socket()
        self.watchdog_seconds = watchdog_seconds if watchdog_seconds is not None else paths.systemd_watchdog_seconds()
        self._last_ping = 0.0

    @property
    def ping_interval(self) -> float | None:
        """How often the loop must ping: half the watchdog timeout, as systemd recommends."""
        return self.watchdog_seconds / 2 if self.watchdog_seconds else None

    def _send(self, state: str) -> None:
        if not self.socket_path:
            return
        address = "\0" + self.socket_path[1:] if self.socket_path.startswith("@") else self.socket_path
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto(state.encode(), address)
            except OSError:
                pass  # systemd gone or socket unreadable: supervision goes on regardless

    def ready(self) -> None:
        self._send("READY=1")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def watchdog(self) -> None:
        """Ping at most every half interval; called from every turn of the supervision loop."""
        interval = self.ping_interval
        now = time.monotonic()
        if interval and now - self._last_ping >= interval:
            self._send("WATCHDOG=1")
            self._last_ping = now
