"""The client-facing port: a small HTTP/1.1 reverse proxy that sends each request to the current backend.

Why a proxy at all (docs/operations.md, "Version switches"): it decides per request, so a version
switch moves new requests to the new server while requests in flight finish on the old one, and no
connection is ever refused or reset by a server that is going away. Why asyncio streams and not
starlette/httpx: the agent must keep working when the server's own stack is what broke, and a byte
pipe is all that is needed; the response body is copied as it arrives, so server-sent events stream
through unbuffered.

Deliberately simple HTTP handling:
- one request per client connection: the answer carries `Connection: close` (loopback connects are
  cheap, and no client keeps a pooled connection into a backend that is being drained);
- request bodies need Content-Length (the OpenAI clients send it); chunked uploads get 411;
- a request is retried on the current backend only when no byte of an answer came back (connection
  refused or reset, or a 503 from a backend that is no longer current, such as one draining); it is held
  while no backend is ready, up to `wait_seconds`, then answered 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time

log = logging.getLogger("lmpack.agent")

HEAD_LIMIT = 64 * 1024
BODY_LIMIT = 64 * 1024 * 1024
RETRY_PAUSE = 0.05
CLOSE_SECONDS = 2.0  # how long a closing client connection may take before it is aborted
_HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade"}


class _NoAnswer(Exception):
    """The backend gave no byte of an answer: the request may safely go to another (or the same) backend."""


class Proxy:
    """Listens on (host, port) on its own thread and event loop; `set_backend` switches where requests go.

    `set_backend` is an attribute swap read once per request attempt, so after it returns every new
    request goes to the new backend. `in_flight(url)` counts the requests a backend is still answering,
    which the switch waits for before it stops the old server.
    """

    def __init__(self, host: str, port: int, *, wait_seconds: float = 30.0, connect_timeout: float = 5.0):
        self.host, self.port, self.wait_seconds, self.connect_timeout = host, port, wait_seconds, connect_timeout
        self.backend: str | None = None  # "http://127.0.0.1:PORT" or None while nothing is ready
        self._in_flight: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task] = set()  # the connections being handled (loop thread only)
        self.requests_total = 0
        self.retries_total = 0
        self.unavailable_total = 0  # answered 503 by the proxy: no backend within wait_seconds

    # --- the agent's side (any thread) ---------------------------------------------------------------------

    def start(self) -> None:
        """Bind (raising OSError here, in the caller's thread, when the port is taken), then serve."""
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, self.host, self.port, limit=HEAD_LIMIT, backlog=1024)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._thread = threading.Thread(target=self._loop.run_forever, name="lmpack-agent-proxy", daemon=True)
        self._thread.start()

    def set_backend(self, url: str | None) -> None:
        if url != self.backend:
            log.info("proxy: new requests go to %s", url or "nothing (held until a server is ready)")
        self.backend = url

    def in_flight(self, url: str) -> int:
        with self._lock:
            return self._in_flight[url]

    def wait_idle(self, url: str, timeout: float) -> bool:
        """Wait until `url` answers no request through the proxy (True), or `timeout` passes (False)."""
        deadline = time.monotonic() + timeout
        while self.in_flight(url) and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.in_flight(url) == 0

    def close_listener(self) -> None:
        """Stop accepting connections; requests already in flight go on."""
        if self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listener, give in-flight requests up to `timeout`, then stop the loop."""
        self.close_listener()
        deadline = time.monotonic() + timeout
        while self._total_in_flight() and time.monotonic() < deadline:
            time.sleep(0.02)
        if self._thread is not None:
            # connections still open (a client that never sent its request) end now, not as pending tasks
            asyncio.run_coroutine_threadsafe(self._end_connections(), self._loop).result(timeout)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)

    def status(self) -> dict:
        return {
            "port": self.port,
            "backend": self.backend,
            "in_flight": self._total_in_flight(),
            "requests_total": self.requests_total,
            "retries_total": self.retries_total,
            "unavailable_total": self.unavailable_total,
        }

    def _total_in_flight(self) -> int:
        with self._lock:
            return sum(self._in_flight.values())

    # --- the event loop's side -----------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Held here until done: asyncio keeps a connection's task only through its transport, and a task whose
        # client hung up mid-close was collected while pending ("Task was destroyed but it is pending").
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            request = await _read_request(reader, writer)
            if request is not None:
                self.requests_total += 1
                await self._forward(request, writer)
        except (ConnectionError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client went away or sent garbage: nothing to answer
        finally:
            await _close(writer)
            if task is not None:
                self._tasks.discard(task)

    async def _end_connections(self) -> None:
        tasks = [task for task in self._tasks if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _forward(self, request: bytes, client: asyncio.StreamWriter) -> None:
        deadline = time.monotonic() + self.wait_seconds
        lost: set[str] = set()
        while True:
            backend = self.backend
            if backend is not None:
                try:
                    await self._exchange(backend, request, client)
                    return
                except _NoAnswer as exc:
                    if backend not in lost:
                        # The wait for a server starts again when a server it was given to is gone: a request
                        # that sat on a hung server until the agent killed it is served by the new one, however
                        # long the hang took to notice (longer than backend_wait_seconds with the defaults).
                        lost.add(backend)
                        deadline = max(deadline, time.monotonic() + self.wait_seconds)
                    if time.monotonic() >= deadline:
                        log.warning("proxy: no answer from %s: %s", backend, exc)
                        break
                    self.retries_total += 1
            elif time.monotonic() >= deadline:
                break
            await asyncio.sleep(RETRY_PAUSE)
        self.unavailable_total += 1
        await _send_error(client, 503, "no ready server behind the lmpack agent; retry later")

    async def _exchange(self, backend: str, request: bytes, client: asyncio.StreamWriter) -> None:
        host, port = backend.removeprefix("http://").rsplit(":", 1)
        with self._counted(backend):
            try:
                upstream_reader, upstream = await asyncio.wait_for(
                    asyncio.open_connection(host, int(port), limit=HEAD_LIMIT), self.connect_timeout
                )
            except (OSError, asyncio.TimeoutError) as exc:
                raise _NoAnswer(f"connect: {exc!r}") from None
            try:
                try:
                    upstream.write(request)
                    await upstream.drain()
                    head = await upstream_reader.readuntil(b"\r\n\r\n")
                except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                    raise _NoAnswer(f"no response: {exc!r}") from None
                if head.startswith((b"HTTP/1.1 503", b"HTTP/1.0 503")) and backend != self.backend:
                    raise _NoAnswer("503 from a server that is no longer current")  # draining or not yet ready
                client.write(_rewrite_response_head(head))
                await client.drain()
                await _copy_body(upstream_reader, client, head, head_only=request.startswith(b"HEAD "))
            finally:
                upstream.close()

    @contextlib.contextmanager
    def _counted(self, backend: str):
        with self._lock:
            self._in_flight[backend] += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight[backend] -= 1


async def _copy_body(
    upstream: asyncio.StreamReader, client: asyncio.StreamWriter, head: bytes, *, head_only: bool
) -> None:
    """Copy the response body as it arrives (SSE events are not held back), by its own framing.

    Framing, not EOF, ends the exchange: a backend that keeps the connection open despite
    `Connection: close` must not keep the request counted in flight (the switch waits for that count).
    """
    status = int(head.split(b" ", 2)[1])
    headers = {
        line.partition(b":")[0].strip().lower(): line.partition(b":")[2].strip()
        for line in head[:-4].split(b"\r\n")[1:]
    }

    async def send(data: bytes) -> None:
        client.write(data)
        await client.drain()

    if head_only or status in (204, 304) or 100 <= status < 200:
        return
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        while True:
            size_line = await upstream.readuntil(b"\r\n")
            await send(size_line)
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (trailer := await upstream.readuntil(b"\r\n")) != b"\r\n":
                    await send(trailer)
                await send(trailer)
                return
            await send(await upstream.readexactly(size + 2))
    if b"content-length" in headers:
        left = int(headers[b"content-length"])
        while left > 0:
            chunk = await upstream.read(min(left, 65536))
            if not chunk:
                return
            left -= len(chunk)
            await send(chunk)
        return
    while chunk := await upstream.read(65536):
        await send(chunk)


async def _read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes | None:
    """The whole request, re-framed for one exchange with a backend; None when an error was answered."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].split(b"\r\n")
    headers, length = [], 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        key = name.strip().lower()
        if key == b"transfer-encoding":
            await _send_error(writer, 411, "send the request body with Content-Length")
            return None
        if key == b"content-length":
            try:
                length = int(value.strip())
            except ValueError:
                await _send_error(writer, 400, "malformed Content-Length")
                return None
        if key not in _HOP_BY_HOP:
            headers.append(line)
    if length > BODY_LIMIT:
        await _send_error(writer, 413, "request body too large")
        return None
    body = await reader.readexactly(length) if length else b""
    return b"\r\n".join([lines[0], *headers, b"Connection: close", b"", b""]) + body


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close a client connection; one that does not finish closing in a moment (its peer is gone) is aborted."""
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), CLOSE_SECONDS)
    except asyncio.TimeoutError:
        writer.transport.abort()
    except Exception:  # the peer reset it: the connection is gone either way
        pass


def _rewrite_response_head(head: bytes) -> bytes:
    lines = [line for line in head[:-4].split(b"\r\n") if line.partition(b":")[0].strip().lower() not in _HOP_BY_HOP]
    return b"\r\n".join([*lines, b"Connection: close", b"", b""])


async def _send_error(writer: asyncio.StreamWriter, code: int, message: str) -> None:
    reason = {400: "Bad Request", 411: "Length Required", 413: "Content Too Large", 503: "Service Unavailable"}[code]
    body = f'{{"error": {{"message": "{message}", "type": "server_error", "code": "proxy_{code}"}}}}'.encode()
    writer.write(
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"Retry-After: 1\r\nConnection: close\r\n\r\n" % (code, reason.encode(), len(body)) + body
    )
    with contextlib.suppress(ConnectionError):
        await writer.drain()
