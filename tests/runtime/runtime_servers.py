"""A real `lmpack serve` process on a free loopback port, for the server tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, process: subprocess.Popen, url: str, log: Path, verify: Any = True):
        self.process, self.url, self.log, self.verify = process, url, log, verify

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, verify=self.verify, **kwargs)


@contextlib.contextmanager
def run_server(
    variant: Path, *flags: str, tmp: Path, env: dict[str, str] | None = None, tls: ssl.SSLContext | None = None
) -> Iterator[Server]:
    """`python -m lmpack serve VARIANT` in a subprocess; yields once /health/ready answers 200.

    With `tls` (a client context that trusts the server's certificate) the server is reached over https.
    """
    port = _free_port()
    log = tmp / f"server-{port}.log"
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    environment.pop("LMPACK_API_KEYS", None)  # only the keys a test sets
    environment.update(env or {})
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "lmpack", "serve", str(variant), "--port", str(port), "--threads", "1", *flags],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=environment,
            cwd=tmp,
        )
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    verify = tls if tls is not None else True
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                raise AssertionError(f"server exited with {process.returncode}:\n{log.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health/ready", timeout=2, verify=verify).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise AssertionError(f"server not ready after 90 s:\n{log.read_text()}")
            time.sleep(0.2)
        yield Server(process, url, log, verify)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def serve_in_thread(app) -> Iterator[str]:
    """Run an ASGI app with uvicorn in a thread on a free loopback port; yields its base URL.

    For tests that need to reach inside the engine (slow it down, count calls), which a subprocess cannot.
    """
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise AssertionError("the in-thread server did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    try:
        while httpx.get(f"{url}/health/ready").status_code != 200:
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
