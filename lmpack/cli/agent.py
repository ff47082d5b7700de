"""`lmpack agent`, `lmpack status`, `lmpack switch`, `lmpack rollback`: run the supervising daemon, ask it how
things are, and move its traffic between installed versions without a failed request."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from lmpack import api
from lmpack.cli.common import emit_json, handle_errors, json_option


@click.command("agent")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    required=True,
    help="The agent's TOML configuration (see docs/operations.md).",
)
@click.option(
    "--strict",
    is_flag=True,
    help="Refuse to start when a notifier cannot deliver (no syslog socket); without it, a warning line.",
)
@handle_errors
def agent_command(config_path: Path, strict: bool) -> None:
    """Start `lmpack serve` for the configured variant and keep it healthy until SIGTERM.

    Probes liveness and readiness, restarts after repeated liveness misses, measures the host, the
    server and the GPU, raises alerts, and answers /status and /metrics on its own loopback port. With
    [updates], takes signed bundles copied into an inbox: verified, installed, switched to (by policy and
    time window), rolled back if they keep failing.

    \b
    Examples:
      lmpack agent --config /etc/lmpack/agent.toml
      lmpack status --json
      cp smollm2-1.1.0.lmpack /srv/lmpack/inbox/   # with [updates] inbox = "/srv/lmpack/inbox"
    """
    sys.exit(api.run_agent(config_path, strict=strict))


_agent_option = click.option(
    "--agent",
    "agent_url",
    default=api.DEFAULT_AGENT_URL,
    show_default=True,
    help="The agent's address ([agent] host and port in its configuration).",
)
_prefix_option = click.option(
    "--prefix",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Install root; when given, it must be the one the agent serves from.",
)
_timeout_option = click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=600.0,
    show_default=True,
    help="Seconds to wait for the agent's answer (the new server's start included).",
)


@click.command("switch")
@click.argument("name")
@click.argument("version")
@_prefix_option
@_agent_option
@_timeout_option
@json_option
@handle_errors
def switch_command(name: str, version: str, prefix: Path | None, agent_url: str, timeout: float, as_json: bool) -> None:
    """Move the running agent's traffic to installed release NAME VERSION without a failed request.

    The agent starts VERSION beside the serving one, waits for it to be ready, points `current` and
    then every new request at it, and drains the old server. A VERSION that does not get ready is not
    switched to (exit 19); one that then crashes repeatedly during its probation is rolled back.

    \b
    Examples:
      lmpack switch smollm2 1.1.0
      lmpack switch smollm2 1.1.0 --prefix /opt/lmpack --agent http://127.0.0.1:9100 --json
    """
    _show(api.agent_switch(name, version, url=agent_url, prefix=prefix, timeout=timeout), as_json)


@click.command("rollback")
@click.argument("name")
@_prefix_option
@_agent_option
@_timeout_option
@json_option
@handle_errors
def rollback_command(name: str, prefix: Path | None, agent_url: str, timeout: float, as_json: bool) -> None:
    """Switch NAME back to the previous healthy release, the same way as `lmpack switch`.

    \b
    Example:
      lmpack rollback smollm2
    """
    _show(api.agent_switch(name, None, url=agent_url, prefix=prefix, timeout=timeout), as_json)


def _show(result: dict, as_json: bool) -> None:
    if as_json:
        emit_json(result)
    elif result["action"] == "unchanged":
        click.echo(f"{result['name']} {result['version']} is already serving")
    else:
        click.echo(
            f"{result['action']} {result['name']} to {result['version']} (was {result['previous']}): "
            f"ready after {result['ready_seconds']:.2f} s, {result['seconds']:.2f} s in all"
        )


@click.command("status")
@_agent_option
@json_option
@handle_errors
def status_command(agent_url: str, as_json: bool) -> None:
    """Show what the running agent knows: the server, its restarts, measurements and alerts."""
    status = api.agent_status(agent_url)
    if as_json:
        emit_json(status)
        return
    server, values = status.get("server", {}), status.get("metrics", {})
    click.echo(
        f"server   {server.get('phase')}  pid {server.get('pid')}  live {server.get('live')}  "
        f"ready {server.get('ready')}  {server.get('url')}"
    )
    click.echo(
        f"variant  {server.get('variant')}" + (f"  (release {server['version']})" if server.get("version") else "")
    )
    switch = status.get("switch") or {}
    release = switch.get("release")
    if release:
        line = f"release  {release['name']}: serving {release['serving']}, installed current {release['current']}"
        if release["current"] != release["serving"] and release["current"] is not None:
            line += f"; run `lmpack switch {release['name']} {release['current']}` to serve it"
        click.echo(line)
    if switch.get("proxy"):
        click.echo(
            f"clients  port {switch['proxy']['port']} -> {switch['proxy']['backend']}  "
            f"({switch.get('switches_total', 0)} switches, {switch.get('rollbacks_total', 0)} rollbacks)"
        )
    if switch.get("probation"):
        probation = switch["probation"]
        click.echo(
            f"probation {probation['version']}: {probation['seconds_left']:.0f} s left, "
            f"{probation['restarts']} restarts (rolls back to {probation['previous']})"
        )
    if switch.get("candidate"):
        click.echo(f"switching to {switch['candidate'].get('version')}: {switch['candidate'].get('phase')}")
    updates = status.get("updates")
    if updates:
        window = f", window {updates['window']}" + ("" if updates["in_window"] else " (closed)")
        click.echo(
            f"updates  {updates['inbox']}: policy {updates['policy']}{window if updates['window'] else ''}"
            + (f"; {len(updates['pending'])} arriving" if updates["pending"] else "")
            + (f"; {updates['waiting_for_window']} waits for the window" if updates["waiting_for_window"] else "")
        )
        for event in updates["recent"][-3:]:
            detail = event.get("version") or event.get("file")
            click.echo(
                f"update   {event['time']} {event['alert']} {detail}"
                + (f": {event['reason']}" if event.get("reason") else "")
            )
    click.echo(
        f"restarts {server.get('restarts_total')} total, {server.get('restarts_15m')} in 15 min"
        + (f"; last: {server['last_restart_reason']}" if server.get("last_restart_reason") else "")
    )
    for name in (
        "request_rate",
        "error_rate",
        "rejected_rate",
        "latency_p95_seconds",
        "queue_depth",
        "host_cpu_percent",
        "host_memory_percent",
        "host_disk_percent",
        "server_cpu_percent",
    ):
        if values.get(name) is not None:
            click.echo(f"{name:24} {values[name]:.4g}")
    if values.get("server_rss_bytes") is not None:
        click.echo(f"{'server_rss':24} {values['server_rss_bytes'] / 2**20:.1f} MiB")
    gpu = status.get("gpu", {})
    click.echo(
        "gpu      " + (gpu.get("name", "available") if gpu.get("available") else f"unavailable: {gpu.get('reason')}")
    )
    for alert in status.get("alerts", []):
        if alert["state"] != "inactive":
            click.echo(f"alert    {alert['name']} {alert['state']} ({alert['severity']})")
