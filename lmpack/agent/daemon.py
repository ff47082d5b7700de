"""`lmpack agent`: the loop that ties supervision, switches, measurements and alerts together, and its endpoints.

One thread runs the loop (the servers' ticks every half second at most, every 50 ms during a switch;
measurements and alert rules every metrics interval); the endpoint serves the latest snapshot from
another thread, so `lmpack status` answers even while a probe waits out its timeout. Clients reach
the server through the agent's proxy (proxy.py) on [server] port; POST /switch and /rollback on the
agent's own port queue a version switch for the loop (switch.py) and wait for its result. The endpoint is
the standard library's HTTP server on loopback: the agent must keep working when the server's own stack
(starlette, uvicorn) is what broke.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from lmpack.agent.alerts import AlertEngine
from lmpack.agent.config import AgentConfig
from lmpack.agent.inbox import Inbox
from lmpack.agent.metrics import HostSampler, ServerScrape, gpu_sample, render_prometheus
from lmpack.agent.notifiers import Dispatcher, Notifier, make_notifier
from lmpack.agent.proxy import Proxy
from lmpack.agent.supervisor import resolve_variant
from lmpack.agent.switch import VersionSwitcher
from lmpack.agent.systemd import SystemdNotifier
from lmpack.errors import AgentError, ConfigError, LmpackError

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


ControlFn = Callable[[str, dict[str, Any]], tuple[int, dict[str, Any]]]


def _handler(snapshot: Snapshot, control: ControlFn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            try:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(min(length, 65536)) or b"{}")
                if not isinstance(body, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                self._send(
                    400, json.dumps({"error": {"message": f"bad request body: {exc}"}}).encode(), "application/json"
                )
                return
            code, document = control(self.path, body)
            self._send(code, json.dumps(document, sort_keys=True, default=str).encode(), "application/json")

        def do_GET(self) -> None:
            status, values = snapshot.get()
            if self.path == "/status":
                self._send(200, json.dumps(status, sort_keys=True, default=str).encode(), "application/json")
            elif self.path == "/metrics":
                self._send(200, render_prometheus(values).encode(), "text/plain; version=0.0.4; charset=utf-8")
            else:
                self._send(
                    404,
                    b'{"error": "not found: try /status or /metrics (POST /switch, /rollback)"}',
                    "application/json",
                )

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
    def __init__(self, config: AgentConfig, *, strict: bool = False):
        self.config = config
        self.strict = strict  # refuse to start with a notifier that cannot deliver, rather than warn
        self.stopping = threading.Event()
        self.wake = threading.Event()  # a signal or a queued switch: run the loop now
        self.proxy = Proxy(config.server.host, config.server.port, wait_seconds=config.switch.backend_wait_seconds)
        self.switcher = VersionSwitcher(config, self.proxy, wake=self.wake.set)
        self.host = HostSampler(config.disk_path)
        self.scrape = ServerScrape(self.switcher.active.url, timeout=config.supervision.probe_timeout)
        self.alerts = AlertEngine(config.rules)
        self.snapshot = Snapshot()
        self.started = time.monotonic()
        self.inbox: Inbox | None = None  # made in run(), once the notifiers exist

    def control(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """POST /switch {"name", "version", "prefix"?} or /rollback {"name", "prefix"?}: wait for the outcome."""
        if path not in ("/switch", "/rollback"):
            return 404, {"error": {"message": f"no such control endpoint: {path}"}}
        try:
            version = body.get("version") if path == "/switch" else None
            if path == "/switch" and not isinstance(version, str):
                return 400, {"error": {"message": 'POST /switch needs a "version"'}}
            prefix = body.get("prefix")
            future = self.switcher.request(str(body.get("name")), version, None if prefix is None else str(prefix))
            timeout = self.config.supervision.startup_timeout + self.config.server.drain_seconds + 60
            return 200, future.result(timeout=timeout)
        except LmpackError as exc:
            return 409, {"error": {"type": type(exc).__name__, "message": exc.message, "hint": exc.hint}}
        except TimeoutError:
            return 504, {"error": {"message": "the switch is still running; see lmpack status"}}

    def collect(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """One round of measurements: the flat values alert rules see, and the GPU block for /status."""
        server = self.switcher.active.status()
        if self.scrape.url != f"{server['url']}/metrics":  # a switch: the new server's counters start fresh
            self.scrape = ServerScrape(server["url"], timeout=self.config.supervision.probe_timeout)
        gpu = gpu_sample()
        values: dict[str, Any] = {
            **self.host.sample(server["pid"]),
            **(self.scrape.sample() if server["live"] else {}),
            **{k: v for k, v in gpu.items() if k.startswith("gpu_")},
            "server_up": 1.0 if server["pid"] else 0.0,
            "server_live": float(server["live"]),
            "server_ready": float(server["ready"]),
            "server_restarts_total": float(server["restarts_total"]),
            "server_restarts_15m": float(server["restarts_15m"]),
            "switch_failures_recent": float(self.switcher.failures_recent()),
        }
        return values, gpu

    def publish(self, values: dict[str, Any], gpu: dict[str, Any]) -> None:
        status = {
            "agent": {
                "phase": "stopping" if self.stopping.is_set() else "running",
                "uptime_seconds": round(time.monotonic() - self.started, 3),
                "config": self.config.source,
            },
            "server": self.switcher.active.status(),
            "switch": self.switcher.status(),
            "metrics": values,
            "gpu": {k: v for k, v in gpu.items() if not k.startswith("gpu_")},
            "alerts": self.alerts.snapshot(),
            "updates": self.inbox.status() if self.inbox is not None else None,
        }
        self.snapshot.set(status, values)

    def _check_notifiers(self, notifiers: list[Notifier]) -> None:
        """A notifier that cannot deliver (no syslog socket here) is said at start-up: a warning, or with
        `strict` a refusal to start, rather than a failed delivery at the first alert."""
        for notifier in notifiers:
            problem = notifier.problem()
            if problem is None:
                continue
            if self.strict:
                raise ConfigError(
                    f"{self.config.source}: {problem}",
                    hint="fix or remove that [[notifiers]] entry, or start without --strict to only warn",
                )
            log.warning("alerts cannot be delivered through %s: %s", type(notifier).__name__, problem)

    def run(self) -> int:
        """Supervise until SIGTERM or SIGINT; then drain the server and exit 0."""
        resolve_variant(self.config.server)  # a wrong path fails now, before anything starts
        notifiers = [make_notifier(spec) for spec in self.config.notifiers]
        self._check_notifiers(notifiers)
        http = self._bind()
        dispatcher = Dispatcher(notifiers)

        def on_signal(*_: Any) -> None:
            self.stopping.set()
            self.wake.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        self.publish({}, {})
        threading.Thread(target=http.serve_forever, name="lmpack-agent-http", daemon=True).start()
        log.info(
            "agent on http://%s:%d, clients on http://%s:%d, supervising %s",
            self.config.host,
            http.server_address[1],
            self.config.server.host,
            self.proxy.port,
            self.switcher.active.url,
        )
        self._start_inbox(dispatcher)
        systemd = SystemdNotifier()
        systemd.ready()
        next_metrics = 0.0
        try:
            while not self.stopping.is_set():
                tick = time.monotonic()
                systemd.watchdog()  # a hung supervision loop stops pinging, and systemd restarts the agent
                self.switcher.tick()
                if tick >= next_metrics:
                    values, gpu = self.collect()
                    for event in self.alerts.evaluate(values):
                        dispatcher.publish(event)
                    self.publish(values, gpu)
                    next_metrics = tick + self.config.metrics_interval
                else:
                    self.publish(*self.snapshot_values())
                pause = min(self.switcher.wake_seconds, systemd.ping_interval or self.switcher.wake_seconds)
                self.wake.wait(max(0.0, tick + pause - time.monotonic()))
                self.wake.clear()
        finally:
            systemd.stopping()
            log.info("stopping: draining the server")
            self.publish(*self.snapshot_values())
            self.proxy.close_listener()
            self.proxy.wait_idle(self.switcher.active.url, self.config.server.drain_seconds)
            code = self.switcher.stop()
            log.info("the server stopped with status %s", code)
            self.proxy.stop(timeout=1.0)
            dispatcher.close()
            http.shutdown()
            http.server_close()
        return 0

    def _start_inbox(self, dispatcher: Dispatcher) -> None:
        """[updates]: a thread that takes bundles from the inbox (inbox.py) until the agent stops."""
        settings = self.config.updates
        if settings is None:
            return
        switcher = self.switcher
        inbox = self.inbox = Inbox(
            settings,
            self.config.server,
            request_switch=switcher.request,
            serving=lambda: {"version": switcher.active.version, "rolled_back": sorted(switcher.bad)},
            publish=dispatcher.publish,
            switch_timeout=self.config.supervision.startup_timeout + self.config.server.drain_seconds + 60,
        )

        def run() -> None:
            while not self.stopping.wait(settings.poll_seconds):
                try:
                    inbox.poll()
                except Exception:  # one bad round must not end the updates: said, and the next round runs
                    log.exception("update: the inbox round failed")

        threading.Thread(target=run, name="lmpack-agent-inbox", daemon=True).start()

    def snapshot_values(self) -> tuple[dict[str, Any], dict[str, Any]]:
        status, values = self.snapshot.get()
        return values, status.get("gpu", {})

    def _bind(self) -> ThreadingHTTPServer:
        """The agent's own port, then the clients' port (the proxy): either taken fails the start."""
        try:
            server = ThreadingHTTPServer((self.config.host, self.config.port), _handler(self.snapshot, self.control))
        except OSError as exc:
            raise AgentError(
                f"cannot listen on {self.config.host}:{self.config.port}: {exc.strerror}",
                hint="another agent may be running; set [agent] port",
            ) from None
        server.daemon_threads = True
        try:
            self.proxy.start()
        except OSError as exc:
            server.server_close()
            raise AgentError(
                f"cannot listen for clients on {self.config.server.host}:{self.config.server.port}: {exc.strerror}",
                hint="another server or agent may hold it; set [server] port",
            ) from None
        return server


def run_agent(config: AgentConfig, *, strict: bool = False) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return Agent(config, strict=strict).run()
