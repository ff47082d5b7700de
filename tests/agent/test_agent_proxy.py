"""The agent's reverse proxy against small standard-library backends: streaming, switching, retries, limits."""

from __future__ import annotations

import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from lmpack.agent.config import load_agent_config
from lmpack.agent.proxy import Proxy
from lmpack.errors import ConfigError


class Backend:
    """Answers every POST with its name; /stream sends one SSE event, waits for `release`, then the last one."""

    def __init__(self, name: str, *, status: int = 200):
        self.release = threading.Event()
        self.bodies: list[bytes] = []
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                backend.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/stream":
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    self._chunk(b"data: first\n\n")
                    backend.release.wait(10)
                    self._chunk(b"data: [DONE]\n\n")
                    self.wfile.write(b"0\r\n\r\n")
                    return
                body = name.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "keep-alive")
                self.end_headers()
                self.wfile.write(body)

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy():
    proxy = Proxy("127.0.0.1", 0, wait_seconds=2)
    proxy.start()
    yield proxy
    proxy.stop(timeout=1)


def test_requests_follow_the_backend_and_streams_are_not_buffered(proxy):
    old, new = Backend("old"), Backend("new")
    client = httpx.Client(base_url=f"http://127.0.0.1:{proxy.port}", timeout=10)
    try:
        proxy.set_backend(old.url)
        answer = client.post("/v1/completions", json={"prompt": "x"})
        assert answer.text == "old" and answer.headers["connection"] == "close"
        assert old.bodies == [b'{"prompt":"x"}']
        with client.stream("POST", "/stream", json={}) as stream:
            lines = stream.iter_lines()
            assert next(lines) == "data: first"  # arrived while the backend still holds the rest
            assert proxy.in_flight(old.url) == 1
            proxy.set_backend(new.url)  # a switch in the middle of a stream
            assert client.post("/v1/completions", json={}).text == "new"
            old.release.set()
            assert [line for line in lines if line] == ["data: [DONE]"]
        assert proxy.wait_idle(old.url, timeout=2)
    finally:
        client.close()
        old.close()
        new.close()


def test_a_request_is_retried_when_no_answer_came_and_held_while_nothing_is_ready(proxy):
    gone, draining, good = Backend("gone"), Backend("draining", status=503), Backend("good")
    gone.close()  # connections are refused from now on
    client = httpx.Client(base_url=f"http://127.0.0.1:{proxy.port}", timeout=10)
    try:
        proxy.set_backend(gone.url)
        threading.Timer(0.3, proxy.set_backend, args=(good.url,)).start()
        assert client.post("/x", json={}).text == "good"  # refused, retried until the backend moved
        proxy.set_backend(None)
        threading.Timer(0.3, proxy.set_backend, args=(good.url,)).start()
        assert client.post("/x", json={}).text == "good"  # held while there was no backend
        proxy.set_backend(draining.url)
        assert client.post("/x", json={}).status_code == 503  # a 503 from the current backend is its answer
        proxy.set_backend(None)
        started = time.monotonic()
        unavailable = client.post("/x", json={})
        assert unavailable.status_code == 503 and unavailable.headers["retry-after"] == "1"
        assert 2 <= time.monotonic() - started < 5 and proxy.status()["unavailable_total"] == 1
        chunked = client.post("/x", content=iter([b"a", b"b"]))  # no Content-Length
        assert chunked.status_code == 411
    finally:
        client.close()
        draining.close()
        good.close()


def test_switch_settings_are_read_strictly(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text(
        'schema_version = 1\n[server]\nvariant = "/v"\n[switch]\nprobation_seconds = 60\nprobation_failures = 3\n'
    )
    switch = load_agent_config(path).switch
    assert switch.probation_seconds == 60 and switch.probation_failures == 3 and switch.alert_window_seconds == 900
    path.write_text('schema_version = 1\n[server]\nvariant = "/v"\n[switch]\nprobation_failure = 3\n')
    with pytest.raises(ConfigError, match=re.escape("unknown field 'switch.probation_failure'")):
        load_agent_config(path)


def test_a_burst_of_clients_that_hang_up_leaves_no_task_behind(monkeypatch, caplog):
    """Hundreds of short requests a second through the proxy, a third of the clients hanging up before the
    answer and a third mid-request: every connection's task ends; asyncio reports none destroyed while pending
    and no coroutine that ignored its close (both seen in the agent's log before)."""
    import gc
    import socket
    import sys

    unraisable: list[str] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisable.append(repr(u.exc_value)))
    backend = Backend("missing", status=404)
    proxy = Proxy("127.0.0.1", 0, wait_seconds=2)
    proxy.start()
    proxy.set_backend(backend.url)

    def clients(n: int) -> None:
        for i in range(n):
            with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
                if i % 3 == 1:
                    sock.sendall(b"POST /nope HT")  # half a request, then gone
                    continue
                sock.sendall(b"POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
                if i % 3 == 2:
                    assert sock.recv(64).startswith(b"HTTP/1.1 404")

    try:
        with caplog.at_level("WARNING", logger="asyncio"):
            workers = [threading.Thread(target=clients, args=(150,)) for _ in range(6)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join(60)
            time.sleep(0.3)
            gc.collect()
            proxy.stop(timeout=3)
            gc.collect()
    finally:
        backend.close()
    leaks = [r.getMessage() for r in caplog.records if r.name == "asyncio"] + unraisable
    assert leaks == [], f"{len(leaks)} leaked: {leaks[:3]}"
    assert proxy.requests_total >= 600
