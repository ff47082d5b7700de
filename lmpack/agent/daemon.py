"""`lmpack agent`: the loop that ties supervision, measurements and alerts together, and its HTTP endpoint.

One thread runs the loop (the supervisor's tick every half second at most, measurements and alert
rules every metrics interval); the endpoint serves the latest snapshot from another thread, so `lmpack status` answers
even while a probe waits out its timeout. The endpoint is the standard library's HTTP server on
loopback: the agent must keep working when the server's own stack (starlette, uvicorn) is what broke.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from lmpack.agent.alerts import AlertEngine
from lmpack.agent.config import AgentConfig
from lmpack.agent.metrics import HostSampler, ServerScrape, gpu_sample, render_prometheus
from lmpack.agent.notifiers import Dispatcher, make_notifier
from lmpack.agent.supervisor import Supervisor, resolve_variant
from lmpack.errors import AgentError

log = logging.getLogger("lmpack.agent")


class Snapshot:
    """The latest status document, swapped whole under a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._status: dict[str, Any] = {"agent": {"phase": "starting"}}
        self._values: dict[str, Any] = {}

    def set(self, status: dict[str, Any], values: dict[str, Any]) -> None:
        with self._lock:
            self._status, self._values = status, values

    def get(self) -> tuple[dict[str, Any], dict[str, Any]]:
        with self._lock:
            return self._status, self._values


def _handler(snapshot: Snapshot) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, values = snapshot.get()
            if self.path == "/status":
                self._send(200, json.dumps(status, sort_keys=True, default=str).encode(), "application/json")
            elif self.path == "/metrics":
                self._send(200, render_prometheus(values).encode(), "text/plain; version=0.0.4; charset=utf-8")
            else:
                self._send(404, b'{"error": "not found: try /status or /metrics"}', "application/json")

        def _send(self, code: int, body: bytes, media_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", media_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # probes of the agent are not news
            pass

    return Handler


class Agent:
    def __init__(self, config: AgentConfig):
        self.config = config
        self.supervisor = Supervisor(config.server, config.supervision)
        self.host = HostSampler(config.disk_path)
        self.scrape = ServerScrape(config.server_url, timeout=config.supervision.probe_timeout)
        self.alerts = AlertEngine(config.rules)
        self.snapshot = Snapshot()
        self.stopping = threading.Event()
        self.started = time.monotonic()

    def collect(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """One round of measurements: the flat values alert rules see, and the GPU block for /status."""
        server = self.supervisor.status()
        gpu = gpu_sample()
        values: dict[str, Any] = {**self.host.sample(server["pid"]),
                                  **(self.scrape.sample() if server["live"] else {}),
                                  **{k: v for k, v in gpu.items() if k.startswith("gpu_")},
                                  "server_up": 1.0 if server["pid"] else 0.0, "server_live": float(server["live"]),
                                  "server_ready": float(server["ready"]),
                                  "server_restarts_total": float(server["restarts_total"]),
                                  "server_restarts_15m": float(server["restarts_15m"])}
        return values, gpu

    def publish(self, values: dict[str, Any], gpu: dict[str, Any]) -> None:
        status = {"agent": {"phase": "stopping" if self.stopping.is_set() else "running",
                            "uptime_seconds": round(time.monotonic() - self.started, 3),
                            "config": self.config.source},
                  "server": self.supervisor.status(), "metrics": values,
                  "gpu": {k: v for k, v in gpu.items() if not k.startswith("gpu_")},
                  "alerts": self.alerts.snapshot()}
        self.snapshot.set(status, values)

    def run(self) -> int:
        """Supervise until SIGTERM or SIGINT; then drain the server and exit 0."""
        resolve_variant(self.config.server)  # a wrong path fails now, before anything starts
        http = self._bind()
        dispatcher = Dispatcher([make_notifier(spec) for spec in self.config.notifiers])
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        self.publish({}, {})
        threading.Thread(target=http.serve_forever, name="lmpack-agent-http", daemon=True).start()
        log.info("agent on http://%s:%d, supervising %s", self.config.host, http.server_address[1],
                 self.supervisor.url)
        next_metrics = 0.0
        try:
            while not self.stopping.is_set():
                tick = time.monotonic()
                self.supervisor.tick()
                if tick >= next_metrics:
                    values, gpu = self.collect()
                    for event in self.alerts.evaluate(values):
                        dispatcher.publish(event)
                    self.publish(values, gpu)
                    next_metrics = tick + self.config.metrics_interval
                else:
                    self.publish(*self.snapshot_values())
                self.stopping.wait(max(0.0, tick + self.supervisor.wake_seconds - time.monotonic()))
        finally:
            log.info("stopping: draining the server")
            self.publish(*self.snapshot_values())
            code = self.supervisor.stop()
            log.info("the server stopped with status %s", code)
            dispatcher.close()
            http.shutdown()
            http.server_close()
        return 0

    def snapshot_values(self) -> tuple[dict[str, Any], dict[str, Any]]:
        status, values = self.snapshot.get()
        return values, status.get("gpu", {})

    def _bind(self) -> ThreadingHTTPServer:
        try:
            server = ThreadingHTTPServer((self.config.host, self.config.port), _handler(self.snapshot))
        except OSError as exc:
            raise AgentError(f"cannot listen on {self.config.host}:{self.config.port}: {exc.strerror}",
                             hint="another agent may be running; set [agent] port") from None
        server.daemon_threads = True
        return server


def run_agent(config: AgentConfig) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return Agent(config).run()
