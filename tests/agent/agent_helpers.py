"""A real `lmpack agent` process supervising a real `lmpack serve`, and a webhook receiver, on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], Any], *, timeout: float, what: str, every: float = 0.1) -> Any:
    """Poll until predicate() is truthy (its value is returned); fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError):
            value = predicate()
            if value:
                return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def write_config(
    tmp: Path,
    variant: Path | None,
    *,
    server_port: int,
    agent_port: int,
    serve_args: list[str],
    extra: str = "",
    interval: float = 0.3,
    misses: int = 3,
    release: tuple[Path, str] | None = None,
) -> Path:
    """agent.toml for a variant directory, or (release=(prefix, name)) for an installed release."""
    path = tmp / "agent.toml"
    source = f'variant = "{variant}"' if release is None else f'prefix = "{release[0]}"\nrelease = "{release[1]}"'
    path.write_text(f"""schema_version = 1

[server]
{source}
port = {server_port}
args = {json.dumps(["--threads", "1", *serve_args])}
drain_seconds = 5

[supervision]
probe_interval_seconds = {interval}
probe_timeout_seconds = 0.5
liveness_failures = {misses}
startup_timeout_seconds = 60
backoff_initial_seconds = 0.5
backoff_max_seconds = 2

[agent]
port = {agent_port}
metrics_interval_seconds = {interval}
default_alerts = false
{extra}""")
    return path


class AgentProcess:
    def __init__(self, process: subprocess.Popen, url: str, server_url: str, log: Path):
        self.process, self.url, self.server_url, self.log = process, url, server_url, log

    def status(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/status", timeout=2).json()

    def ready_pid(self) -> int | None:
        """The server's pid once the agent has seen it ready, else None."""
        server = self.status()["server"]
        return server["pid"] if server["ready"] and server["phase"] == "running" else None


@contextlib.contextmanager
def run_agent(config: Path, *, tmp: Path, extra_env: dict[str, str] | None = None) -> Iterator[AgentProcess]:
    """`python -m lmpack agent --config CONFIG`; yields once the server it supervises is ready."""
    from lmpack.agent.config import load_agent_config

    parsed = load_agent_config(config)
    log = tmp / "agent.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), **(extra_env or {})}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "lmpack", "agent", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp,
        )
    agent = AgentProcess(process, f"http://127.0.0.1:{parsed.port}", parsed.server_url, log)
    try:
        wait_for(lambda: process.poll() is not None or agent.ready_pid(), timeout=90, what="the first ready server")
        assert process.poll() is None, f"the agent exited with {process.returncode}:\n{log.read_text()}"
        yield agent
    finally:
        pid = None
        with contextlib.suppress(Exception):
            pid = agent.status()["server"]["pid"]
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if pid is not None:  # never leave a server behind, whatever happened to the agent
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


class WebhookReceiver:
    """Collects the JSON bodies POSTed to it; the first `fail_first` requests get a 500 (to exercise retries)."""

    def __init__(self, *, fail_first: int = 0):
        self.events: list[dict[str, Any]] = []
        self.attempts = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.attempts += 1
                if receiver.attempts <= fail_first:
                    self.send_response(500)
                else:
                    receiver.events.append(json.loads(body))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def __enter__(self) -> WebhookReceiver:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
