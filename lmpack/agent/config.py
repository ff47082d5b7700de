"""The agent's TOML configuration, read strictly: every error names the file and the field (or rule).

Nothing here touches the server or the network, so a bad file fails `lmpack agent` before any child
process starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lmpack.agent.alerts import OPERATORS, SEVERITIES, Rule, default_rules
from lmpack.agent.metrics import METRICS
from lmpack.config.toml_reader import TableReader, check_schema_version, load_toml
from lmpack.errors import ConfigError

NOTIFIER_TYPES = ("log", "webhook", "syslog")


@dataclass(frozen=True)
class ServerSpec:
    """What to run: a variant directory, or a variant of an installed release (PREFIX/releases/NAME/current)."""

    variant: str | None
    prefix: Path | None
    release: str | None
    host: str
    port: int
    args: tuple[str, ...]
    drain_seconds: int
    version: str | None = None  # pinned by a switch: serve PREFIX/releases/NAME/VERSION, not `current`


@dataclass(frozen=True)
class Supervision:
    probe_interval: float = 10.0  # seconds between liveness/readiness probes
    probe_timeout: float = 2.0
    liveness_failures: int = 3  # consecutive misses before a restart
    startup_timeout: float = 180.0  # from spawn to ready, else the start failed
    backoff_initial: float = 10.0  # after a failed start; doubles each time
    backoff_max: float = 300.0


@dataclass(frozen=True)
class SwitchPolicy:
    """Version switches ([switch]): how long a new version is on probation and what fails it."""

    probation_seconds: float = 300.0  # after a switch, repeated crashes within this roll it back
    probation_failures: int = 2  # restarts (crashes or failed starts) in probation before the rollback
    alert_window_seconds: float = 900.0  # `switch_failures_recent` counts failed switches and rollbacks this far back
    backend_wait_seconds: float = 30.0  # the proxy holds a request this long while no backend is ready


UPDATE_POLICIES = ("switch", "install-only")


@dataclass(frozen=True)
class UpdateSettings:
    """Updates from an inbox ([updates]): where signed bundles arrive and what the agent does with them."""

    inbox: Path
    public_key: Path
    policy: str = "switch"  # or "install-only": install, alert, wait for `lmpack switch`
    window: tuple[int, int] | None = None  # local minutes since midnight [start, end): switch only inside
    allow_downgrade: bool = False
    settle_seconds: float = 10.0  # a file whose size and time stay the same this long is complete
    poll_seconds: float = 2.0


@dataclass(frozen=True)
class NotifierSpec:
    type: str
    url: str | None = None
    timeout: float = 5.0
    retries: int = 3
    address: str = "/dev/log"


@dataclass(frozen=True)
class AgentConfig:
    source: str
    server: ServerSpec
    supervision: Supervision
    switch: SwitchPolicy = SwitchPolicy()
    host: str = "127.0.0.1"
    port: int = 9100
    metrics_interval: float = 10.0
    disk_path: Path = Path("/")
    rules: tuple[Rule, ...] = ()
    notifiers: tuple[NotifierSpec, ...] = field(default_factory=lambda: (NotifierSpec("log"),))
    updates: UpdateSettings | None = None

    @property
    def server_url(self) -> str:
        return f"http://{self.server.host}:{self.server.port}"


def load_agent_config(path: Path) -> AgentConfig:
    """Read and check agent.toml (format in docs/operations.md); unknown fields and metrics are refused."""
    path = Path(path)
    top = TableReader(load_toml(path), source=str(path))
    check_schema_version(top)
    server = _server(top.table("server", required=True))
    supervision = _supervision(top.table("supervision"))
    switch = _switch(top.table("switch"))
    agent = top.table("agent")
    host, port, interval, disk, defaults = "127.0.0.1", 9100, 10.0, None, True
    if agent is not None:
        host = agent.str("host", host)
        port = agent.int("port", port, minimum=0, maximum=65535)
        interval = agent.float("metrics_interval_seconds", interval, minimum=0.1)
        disk = agent.str("disk_path")
        defaults = agent.bool("default_alerts", True)
        agent.finish()
    rules = _rules(top.tables("alerts"), defaults=defaults)
    notifiers = tuple(_notifier(reader) for reader in top.tables("notifiers")) or (NotifierSpec("log"),)
    updates_table = top.table("updates")
    updates = _updates(updates_table, server, base=path.parent) if updates_table is not None else None
    top.finish()
    disk_path = Path(disk) if disk else (server.prefix or Path("/"))
    return AgentConfig(
        source=str(path),
        server=server,
        supervision=supervision,
        switch=switch,
        host=host,
        port=port,
        metrics_interval=interval,
        disk_path=disk_path,
        rules=rules,
        notifiers=notifiers,
        updates=updates,
    )


def _server(reader: TableReader) -> ServerSpec:
    prefix = reader.str("prefix")
    spec = ServerSpec(
        variant=reader.str("variant"),
        prefix=Path(prefix) if prefix else None,
        release=reader.str("release"),
        host=reader.str("host", "127.0.0.1"),
        port=reader.int("port", 8000, minimum=1, maximum=65535),
        args=tuple(reader.str_list("args")),
        drain_seconds=reader.int("drain_seconds", 30, minimum=0),
    )
    reader.finish()
    if spec.prefix is None and spec.variant is None:
        raise ConfigError(f"{reader.source}: [server] needs 'variant' (a variant directory) or 'prefix' and 'release'")
    if (spec.prefix is None) != (spec.release is None):
        raise ConfigError(f"{reader.source}: [server] 'prefix' and 'release' go together")
    for flag in ("--host", "--port", "--drain-seconds"):
        if flag in spec.args:
            raise ConfigError(f"{reader.source}: field 'server.args' must not hold {flag}: set it as its own field")
    return spec


def _supervision(reader: TableReader | None) -> Supervision:
    if reader is None:
        return Supervision()
    d = Supervision()
    result = Supervision(
        probe_interval=reader.float("probe_interval_seconds", d.probe_interval, minimum=0.05),
        probe_timeout=reader.float("probe_timeout_seconds", d.probe_timeout, minimum=0.05),
        liveness_failures=reader.int("liveness_failures", d.liveness_failures, minimum=1),
        startup_timeout=reader.float("startup_timeout_seconds", d.startup_timeout, minimum=1),
        backoff_initial=reader.float("backoff_initial_seconds", d.backoff_initial, minimum=0),
        backoff_max=reader.float("backoff_max_seconds", d.backoff_max, minimum=0),
    )
    reader.finish()
    return result


def _switch(reader: TableReader | None) -> SwitchPolicy:
    if reader is None:
        return SwitchPolicy()
    d = SwitchPolicy()
    result = SwitchPolicy(
        probation_seconds=reader.float("probation_seconds", d.probation_seconds, minimum=0),
        probation_failures=reader.int("probation_failures", d.probation_failures, minimum=1),
        alert_window_seconds=reader.float("alert_window_seconds", d.alert_window_seconds, minimum=0.1),
        backend_wait_seconds=reader.float("backend_wait_seconds", d.backend_wait_seconds, minimum=0),
    )
    reader.finish()
    return result


def _rules(readers: list[TableReader], *, defaults: bool) -> tuple[Rule, ...]:
    """The shipped defaults (unless turned off), then the file's rules; a rule of the same name replaces one."""
    rules = {rule.name: rule for rule in default_rules()} if defaults else {}
    seen: set[str] = set()
    for reader in readers:
        name = reader.str("name", required=True)
        if name in seen:
            raise ConfigError(f"{reader.source}: alert rule {name!r} is defined twice")
        seen.add(name)
        metric = reader.str("metric", required=True)
        if metric not in METRICS:
            raise ConfigError(
                f"{reader.source}: alert rule {name!r} uses unknown metric {metric!r}",
                hint=f"known metrics: {', '.join(sorted(METRICS))}",
            )
        rules[name] = Rule(
            name=name,
            metric=metric,
            op=reader.str("op", required=True, choices=OPERATORS),
            threshold=reader.float("threshold", required=True),
            for_seconds=reader.float("for_seconds", 0.0, minimum=0),
            severity=reader.str("severity", "warning", choices=SEVERITIES),
        )
        reader.finish()
    return tuple(rules.values())


def _notifier(reader: TableReader) -> NotifierSpec:
    kind = reader.str("type", required=True, choices=NOTIFIER_TYPES)
    spec = NotifierSpec(
        type=kind,
        url=reader.str("url", required=kind == "webhook"),
        timeout=reader.float("timeout_seconds", 5.0, minimum=0.1),
        retries=reader.int("retries", 3, minimum=0, maximum=10),
        address=reader.str("address", "/dev/log"),
    )
    reader.finish()
    if spec.url is not None and not spec.url.startswith(("http://", "https://")):
        raise ConfigError(f"{reader.source}: field '{reader.prefix}url' must be an http:// or https:// URL")
    return spec


def _updates(reader: TableReader, server: ServerSpec, *, base: Path) -> UpdateSettings:
    if server.prefix is None:
        raise ConfigError(f"{reader.source}: [updates] needs [server] prefix and release: updates are installed there")
    window = reader.str("window")
    settings = UpdateSettings(
        inbox=base / reader.str("inbox", required=True),
        public_key=base / reader.str("public_key", required=True),
        policy=reader.str("policy", "switch", choices=UPDATE_POLICIES),
        window=_window(window, reader.source) if window is not None else None,
        allow_downgrade=reader.bool("allow_downgrade", False),
        settle_seconds=reader.float("settle_seconds", 10.0, minimum=0),
        poll_seconds=reader.float("poll_seconds", 2.0, minimum=0.05),
    )
    reader.finish()
    return settings


def _window(text: str, source: str) -> tuple[int, int]:
    """ "HH:MM-HH:MM" (local time; it may run past midnight) as minutes since midnight."""
    try:
        start, end = (_minutes(part) for part in text.split("-"))
    except ValueError:
        raise ConfigError(f"{source}: field 'updates.window' must look like \"02:00-05:00\", not {text!r}") from None
    if start == end:
        raise ConfigError(f"{source}: field 'updates.window' is empty ({text!r})")
    return start, end


def _minutes(part: str) -> int:
    hours, minutes = part.strip().split(":")
    value = int(hours) * 60 + int(minutes)
    if not (0 <= int(hours) < 24 and 0 <= int(minutes) < 60):
        raise ValueError(part)
    return value
