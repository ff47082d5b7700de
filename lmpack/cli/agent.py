"""`lmpack agent` and `lmpack status`: run the supervising daemon, and ask it how things are."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from lmpack import api
from lmpack.cli.common import emit_json, handle_errors, json_option


@click.command("agent")
@click.option("--config", "config_path", type=click.Path(path_type=Path), required=True,
              help="The agent's TOML configuration (see docs/operations.md).")
@handle_errors
def agent_command(config_path: Path) -> None:
    """Start `lmpack serve` for the configured variant and keep it healthy until SIGTERM.

    Probes liveness and readiness, restarts after repeated liveness misses, measures the host, the
    server and the GPU, raises alerts, and answers /status and /metrics on its own loopback port.

    \b
    Examples:
      lmpack agent --config /etc/lmpack/agent.toml
      lmpack status --json
    """
    sys.exit(api.run_agent(config_path))


@click.command("status")
@click.option("--agent", "agent_url", default=api.DEFAULT_AGENT_URL, show_default=True,
              help="The agent's address ([agent] host and port in its configuration).")
@json_option
@handle_errors
def status_command(agent_url: str, as_json: bool) -> None:
    """Show what the running agent knows: the server, its restarts, measurements and alerts."""
    status = api.agent_status(agent_url)
    if as_json:
        emit_json(status)
        return
    server, values = status.get("server", {}), status.get("metrics", {})
    click.echo(f"server   {server.get('phase')}  pid {server.get('pid')}  live {server.get('live')}  "
               f"ready {server.get('ready')}  {server.get('url')}")
    click.echo(f"variant  {server.get('variant')}" + (f"  (release {server['version']})" if server.get("version") else ""))
    click.echo(f"restarts {server.get('restarts_total')} total, {server.get('restarts_15m')} in 15 min"
               + (f"; last: {server['last_restart_reason']}" if server.get("last_restart_reason") else ""))
    for name in ("request_rate", "error_rate", "rejected_rate", "latency_p95_seconds", "queue_depth",
                 "host_cpu_percent", "host_memory_percent", "host_disk_percent", "server_cpu_percent"):
        if values.get(name) is not None:
            click.echo(f"{name:24} {values[name]:.4g}")
    if values.get("server_rss_bytes") is not None:
        click.echo(f"{'server_rss':24} {values['server_rss_bytes'] / 2 ** 20:.1f} MiB")
    gpu = status.get("gpu", {})
    click.echo("gpu      " + (gpu.get("name", "available") if gpu.get("available") else f"unavailable: {gpu.get('reason')}"))
    for alert in status.get("alerts", []):
        if alert["state"] != "inactive":
            click.echo(f"alert    {alert['name']} {alert['state']} ({alert['severity']})")
