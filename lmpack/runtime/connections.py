"""uvicorn's HTTP/1.1 protocol with the limits it lacks: time to send a request's headers, and a connection cap.

uvicorn closes an idle keep-alive connection only after a response; a connection that never sends a request,
or sends its headers a byte at a time, stays open for good (400 slow and 300 idle ones were all still open
after a minute). Each connection here gets `header_timeout` seconds, from when it opens or its last response
ends, to send a request's headers, and at most `max_connections` are open at once (one more is closed at
once). A request whose headers arrived is never cut by this: a long generation keeps its connection.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol


def bounded_protocol(*, header_timeout: float, max_connections: int) -> type[H11Protocol]:
    """The protocol class to give uvicorn's Config(http=...)."""

    class BoundedH11Protocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._header_timer: asyncio.TimerHandle | None = None
            if len(self.connections) > max_connections:
                transport.close()
                return
            self._wait_for_headers()

        def handle_events(self) -> None:
            super().handle_events()
            if self._request_in_progress() and self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._wait_for_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def _wait_for_headers(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(header_timeout, self._headers_late)

        def _request_in_progress(self) -> bool:
            cycle: Any = self.cycle
            return cycle is not None and not cycle.response_complete

        def _headers_late(self) -> None:
            self._header_timer = None
            if not self._request_in_progress() and not self.transport.is_closing():
                self.transport.close()

    return BoundedH11Protocol
