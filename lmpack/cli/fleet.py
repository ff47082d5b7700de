"""`lmpack fleet ...`: one model on several servers through Ray Serve (docs/scale-out.md)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import click

from lmpack.cli.common import emit_json, handle_errors, json_option, phase_printer, quiet_option
from lmpack.cli.serve import setting_option
from lmpack.config.serve import serve_setting

DEFAULT_PREFIX = Path("/opt/lmpack")

_token_option = click.option(
    "--token-file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="The fleet's token (mode 0600; the same file on every node) [env: LMPACK_FLEET_TOKEN_FILE].",
)
_address_option = click.option(
    "--address",
    "cluster",
    default=None,
    metavar="HOST:PORT",
    help="The head's address [default: the head this host joined, noted by `fleet head`/`join`].",
)
_prefix_option = click.option(
    "--prefix",
    type=click.Path(path_type=Path, file_okay=False),
    default=DEFAULT_PREFIX,
    show_default=True,
    help="Install root on every node: releases live in PREFIX/releases/NAME/VERSION.",
)
_metrics_port_option = click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Prometheus metrics on this port: Ray's, Serve's and each replica's lmpack metrics [default: Ray's choice].",
)
_temp_dir_option = click.option(
    "--temp-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Ray's session and log directory on this node [default: Ray's, /tmp/ray].",
)


def _sizes_options(func: Callable) -> Callable:
    """--cpus and --memory-gib: what a node offers Ray's scheduler (head and join alike)."""
    func = click.option(
        "--memory-gib",
        type=click.IntRange(min=1),
        default=None,
        help="Memory for replicas [default: the host's, less the object store and 1 GiB].",
    )(func)
    return click.option(
        "--cpus", type=click.IntRange(min=1), default=None, help="CPUs for replicas [default: all usable]."
    )(func)


def _sizes(cpus: int | None, memory: int | None):
    from lmpack.fleet.node import GIB, NodeSizes

    return NodeSizes.of_host(cpus=cpus, memory_bytes=memory * GIB if memory else None)


def _print_node(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        emit_json(result)
        return
    click.echo(
        f"{result['role']} {result['address']} is up: {result['cpus']} CPUs, "
        f"{result['memory_bytes'] / 2**30:.1f} GiB for replicas, "
        f"{result['object_store_bytes'] / 2**30:.1f} GiB object store"
    )


def _attached(cluster: str | None, token_file: Path | None) -> AbstractContextManager[None]:
    from lmpack.fleet.cluster import connected  # Ray comes with it: only once a command runs

    return connected(cluster, token_file)


@click.group("fleet")
def fleet_group() -> None:
    """Serve one model from several servers through Ray Serve: one address, rolling upgrades, lost nodes
    survived. Needs lmpack's `fleet` extra (Ray) on every node.

    \b
    Examples:
      lmpack fleet token /etc/lmpack/fleet.token          # once; copy the file to every node
      lmpack fleet head --address 10.0.0.1 --token-file /etc/lmpack/fleet.token
      lmpack fleet join 10.0.0.1:6379 --address 10.0.0.2 --token-file /etc/lmpack/fleet.token
      lmpack fleet push smollm2-1.1.0.lmpack
      lmpack fleet deploy smollm2 1.1.0 --replicas 2 --max-replicas 6 --port 8000
      lmpack fleet status --json
      lmpack fleet rollback smollm2
      lmpack fleet manifest smollm2 1.1.0 --image registry.local/lmpack:1 > rayservice.yaml

    See docs/scale-out.md.
    """


@fleet_group.command("token")
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False))
@handle_errors
def token_command(path: Path) -> None:
    """Write a new random fleet token to PATH (mode 0600). Copy it to every node and client of the fleet."""
    from lmpack.fleet.token import create_token

    click.echo(f"wrote {create_token(path)}: copy it to every node (mode 0600)")


@fleet_group.command("head")
@click.option("--address", required=True, metavar="IP", help="This host's address on the cluster network.")
@click.option("--port", type=click.IntRange(1, 65535), default=6379, show_default=True, help="Ray's port on the head.")
@_token_option
@_sizes_options
@click.option(
    "--dashboard", is_flag=True, help="Also start Ray's dashboard on ADDRESS:8265 (it has no authentication)."
)
@_metrics_port_option
@_temp_dir_option
@json_option
@handle_errors
def head_command(address, port, token_file, cpus, memory_gib, dashboard, metrics_port, temp_dir, as_json) -> None:
    """Start the fleet's head node on this host (`ray start --head` with token authentication).

    \b
    Examples:
      lmpack fleet head --address 10.0.0.1 --token-file /etc/lmpack/fleet.token
      lmpack fleet head --address 10.0.0.1 --cpus 8 --memory-gib 48 --json
    """
    from lmpack.fleet.node import start_head

    result = start_head(
        address=address,
        port=port,
        token_file=token_file,
        sizes=_sizes(cpus, memory_gib),
        dashboard=dashboard,
        temp_dir=temp_dir,
        metrics_port=metrics_port,
    )
    _print_node(result, as_json)


@fleet_group.command("join")
@click.argument("head")
@click.option("--address", required=True, metavar="IP", help="This host's address on the cluster network.")
@_token_option
@_sizes_options
@_metrics_port_option
@_temp_dir_option
@json_option
@handle_errors
def join_command(head, address, token_file, cpus, memory_gib, metrics_port, temp_dir, as_json) -> None:
    """Join this host to the fleet whose head is HEAD (HOST:PORT).

    \b
    Examples:
      lmpack fleet join 10.0.0.1:6379 --address 10.0.0.2 --token-file /etc/lmpack/fleet.token
    """
    from lmpack.fleet.node import join

    _print_node(
        join(
            head,
            address=address,
            token_file=token_file,
            sizes=_sizes(cpus, memory_gib),
            temp_dir=temp_dir,
            metrics_port=metrics_port,
        ),
        as_json,
    )


@fleet_group.command("leave")
@click.option("--force", is_flag=True, help="Kill Ray's processes at once (SIGKILL) instead of stopping them.")
@handle_errors
def leave_command(force: bool) -> None:
    """Stop this host's Ray processes: its replicas start again on the other nodes. On the head, this ends the
    fleet (docs/scale-out.md, "Losing the head")."""
    from lmpack.fleet.node import leave

    leave(force=force)
    click.echo("this host left the fleet")


@fleet_group.command("push")
@click.argument("bundle", type=click.Path(path_type=Path, dir_okay=False), required=False)
@click.option(
    "--sync",
    is_flag=True,
    help="Instead of a bundle: give every node the releases the fleet serves, copied from a node that has them.",
)
@_prefix_option
@click.option(
    "--public-key",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Require a manifest.sig by this key: a path on every node [default: each node's install.toml].",
)
@_address_option
@_token_option
@quiet_option
@json_option
@handle_errors
def push_command(bundle, sync, prefix, public_key, cluster, token_file, quiet, as_json) -> None:
    """Verify and install BUNDLE on every alive node, sent over the cluster's network.

    Each node runs the same install as `lmpack install` (signature, every hash, the release venv, the atomic
    switch); a node that refuses the bundle is named and keeps its old release. With --sync, a node that joined
    later gets the releases the fleet serves, copied from a node that has them and verified the same way; a
    node whose copy no longer matches its manifest is named DAMAGED and the copy is taken from another.
    Exits 24 if any node failed.

    \b
    Examples:
      lmpack fleet push smollm2-1.1.0.lmpack --public-key /etc/lmpack/release.pub
      lmpack fleet push smollm2-1.1.0.lmpack --prefix /srv/lmpack --json
      lmpack fleet push --sync
    """
    from lmpack.errors import FleetError
    from lmpack.fleet import push as pushing
    from lmpack.fleet.deploy import deployed_releases

    if (bundle is None) == (not sync):
        raise click.UsageError("give either BUNDLE or --sync")
    say = phase_printer("fleet push", enabled=not (quiet or as_json))
    with _attached(cluster, token_file):
        if sync:
            wanted = deployed_releases()
            say(f"copying {', '.join(f'{n} {v}' for n, v in wanted) or 'nothing'} to the nodes that lack it")
            reports = pushing.sync(wanted, prefix=prefix, public_key=public_key)
        else:
            say(f"sending {bundle} to every node")
            reports = pushing.push(bundle, prefix=prefix, public_key=public_key)
    failed = [r["node"] for r in reports if not r["ok"]]
    if as_json:  # one document, the refusals in it; the exit code still says that a node refused
        emit_json({"nodes": reports, "failed": failed})
        if failed:
            sys.exit(FleetError.exit_code)
        return
    if not reports:
        click.echo("every node has what the fleet serves")
    for r in reports:
        click.echo(
            f"{r['node']}: {r['action']} {r['name']} {r['version']}"
            if r["ok"]
            else f"{r['node']}: {'DAMAGED' if r.get('action') == 'damaged' else 'REFUSED'}: {r['error']}"
        )
    if failed:
        raise FleetError(f"{len(failed)} of {len(reports)} nodes failed: {', '.join(failed)}")


@fleet_group.command("deploy")
@click.argument("name")
@click.argument("version")
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True, help="Replicas at least.")
@click.option(
    "--max-replicas",
    type=click.IntRange(min=1),
    default=None,
    help="Scale up to this many on a queue [default: fixed].",
)
@click.option(
    "--scale-up-delay",
    "scale_up_delay_s",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Seconds of queue before a replica is added (with --max-replicas).",
)
@click.option(
    "--scale-down-delay",
    "scale_down_delay_s",
    type=click.FloatRange(min=0),
    default=600.0,
    show_default=True,
    help="Seconds of too little work before a replica is removed (with --max-replicas).",
)
@click.option("--replicas-per-node", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--gpus-per-replica",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="GPUs each replica reserves.",
)
@click.option(
    "--host",
    "http_host",
    default="0.0.0.0",
    show_default=True,
    help="Where every node's HTTP proxy listens (one setting for all nodes).",
)
@click.option("--port", "http_port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="serve.toml for the replicas (the settings of `lmpack serve`).",
)
@setting_option(serve_setting("threads"))
@setting_option(serve_setting("max_concurrency"))
@setting_option(serve_setting("max_batch"))
@setting_option(serve_setting("queue"))
@setting_option(serve_setting("api_key_file"))
@setting_option(serve_setting("served_model_name"))
@setting_option(serve_setting("variant"))
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=1),
    default=600.0,
    show_default=True,
    help="Seconds for the replicas to become healthy.",
)
@click.option(
    "--agent-config",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="agent.toml whose [[notifiers]] hear of a failed deploy.",
)
@_prefix_option
@_address_option
@_token_option
@quiet_option
@json_option
@handle_errors
def deploy_command(
    name,
    version,
    replicas,
    max_replicas,
    scale_up_delay_s,
    scale_down_delay_s,
    replicas_per_node,
    gpus_per_replica,
    http_host,
    http_port,
    config_file,
    timeout_s,
    agent_config,
    prefix,
    cluster,
    token_file,
    quiet,
    as_json,
    **flags,
) -> None:
    """Serve NAME VERSION from the fleet, or roll the fleet to it replica by replica.

    Every node's proxy answers lmpack serve's OpenAI API on PORT and balances over the replicas. A rolling
    upgrade starts each new replica before an old one drains and stops. A version that does not become
    healthy in --timeout is replaced by the one that served before, and the notifiers of --agent-config hear
    of it.

    \b
    Examples:
      lmpack fleet deploy smollm2 1.1.0 --replicas 2 --max-replicas 6 --port 8000
      lmpack fleet deploy smollm2 1.2.0 --replicas 2 --api-key-file /etc/lmpack/api-keys
    """
    from lmpack.config.serve import resolve_serve_settings
    from lmpack.fleet.deploy import DeployRequest, deploy

    request = DeployRequest(
        name=name,
        version=version,
        prefix=prefix,
        replicas=replicas,
        max_replicas=max_replicas,
        scale_up_delay_s=scale_up_delay_s,
        scale_down_delay_s=scale_down_delay_s,
        replicas_per_node=replicas_per_node,
        gpus_per_replica=gpus_per_replica,
        http_host=http_host,
        http_port=http_port,
        settings=resolve_serve_settings(config_file, flags),
        timeout_s=timeout_s,
    )
    say = phase_printer("fleet deploy", enabled=not (quiet or as_json))
    with _attached(cluster, token_file):
        result = deploy(request, on_phase=say, notify=_notifier(agent_config))
    _print_result(result, as_json)


@fleet_group.command("rollback")
@click.argument("name")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=1), default=600.0, show_default=True)
@_address_option
@_token_option
@quiet_option
@json_option
@handle_errors
def rollback_command(name, timeout_s, cluster, token_file, quiet, as_json) -> None:
    """Roll NAME back to the version that served before the current one, with its settings.

    \b
    Examples:
      lmpack fleet rollback smollm2
    """
    from lmpack.fleet.deploy import rollback

    say = phase_printer("fleet rollback", enabled=not (quiet or as_json))
    with _attached(cluster, token_file):
        result = rollback(name, on_phase=say, timeout_s=timeout_s)
    _print_result(result, as_json)


@fleet_group.command("status")
@_prefix_option
@_address_option
@_token_option
@json_option
@handle_errors
def status_command(prefix, cluster, token_file, as_json) -> None:
    """The fleet's nodes (resources, releases installed, proxy) and each model's version, history and replicas.

    \b
    Examples:
      lmpack fleet status
      lmpack fleet status --json
    """
    from lmpack.fleet.deploy import fleet_status

    with _attached(cluster, token_file):
        status = fleet_status(prefix)
    if as_json:
        emit_json(status)
        return
    for node in status["nodes"]:
        releases = ", ".join(f"{r['name']} {r['version']}" + ("*" if r["current"] else "") for r in node["releases"])
        held = ", ".join(f"{r['model']} {r['version']}" for r in node["replicas"])
        click.echo(
            f"{'head' if node['head'] else 'node'} {node['address']}: {node['cpus']:g} CPUs, "
            f"{node['memory_bytes'] / 2**30:.1f} GiB, {node['gpus']:g} GPUs; proxy {node['proxy'] or '-'}; "
            f"releases: {releases or 'none'}; replicas: {held or 'none'}"
        )
    for name, model in status["models"].items():
        replicas = {}
        for dep in model.get("deployments", {}).values():
            replicas.update(dep["replicas"])
        states = ", ".join(f"{n} {s.lower()}" for s, n in replicas.items()) or "none"
        click.echo(f"{name} {model['version']} on {model['http']}: {model['status']}; replicas: {states}")


def _print_result(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        emit_json(result)
        return
    was = f" (was {result['previous']})" if result["previous"] else ""
    click.echo(
        f"{result['name']} {result['version']} serves{was}: {result['status']['status']} in {result['seconds']} s"
    )


def _notifier(agent_config: Path | None) -> Callable[[dict], None] | None:
    if agent_config is None:
        return None
    from lmpack.agent.config import load_agent_config
    from lmpack.agent.notifiers import make_notifier

    notifiers = [make_notifier(spec) for spec in load_agent_config(agent_config).notifiers]

    def send(event: dict) -> None:
        for notifier in notifiers:
            notifier.send(event)

    return send


@fleet_group.command("manifest")
@click.argument("name")
@click.argument("version")
@click.option("--image", required=True, help="Container image with Python, lmpack and its fleet extra (your registry).")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True, help="Worker pods.")
@click.option("--worker-cpus", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--worker-memory-gib", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--worker-gpus", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--max-replicas", type=click.IntRange(min=1), default=None)
@click.option("--port", "http_port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option(
    "--host-path", type=click.Path(path_type=Path), default=None, help="The nodes' install prefix [default: --prefix]."
)
@click.option(
    "--token-secret", default=None, help="A Secret whose `token` key is Ray's token (token authentication on)."
)
@setting_option(serve_setting("threads"))
@setting_option(serve_setting("max_concurrency"))
@setting_option(serve_setting("api_key_file"))
@_prefix_option
@handle_errors
def manifest_command(
    name,
    version,
    image,
    workers,
    worker_cpus,
    worker_memory_gib,
    worker_gpus,
    replicas,
    max_replicas,
    http_port,
    host_path,
    token_secret,
    prefix,
    **flags,
) -> None:
    """Print a KubeRay RayService (YAML) that serves NAME VERSION as `fleet deploy` would, for Kubernetes.

    Every pod mounts the install prefix from its node (--host-path), where `lmpack install` put the release.

    \b
    Examples:
      lmpack fleet manifest smollm2 1.1.0 --image registry.local/lmpack:0.9 --workers 3 --replicas 2 > rayservice.yaml
      lmpack fleet manifest smollm2 1.1.0 --image registry.local/lmpack:0.9 --token-secret lmpack-fleet-token
    """
    import yaml

    from lmpack.config.serve import resolve_serve_settings
    from lmpack.fleet.deploy import DeployRequest
    from lmpack.fleet.kuberay import manifest

    request = DeployRequest(
        name=name,
        version=version,
        prefix=prefix,
        replicas=replicas,
        max_replicas=max_replicas,
        http_port=http_port,
        settings=resolve_serve_settings(None, flags),
    )
    request.check()
    resource = manifest(
        request,
        image=image,
        workers=workers,
        worker_cpus=worker_cpus,
        worker_memory_gib=worker_memory_gib,
        worker_gpus=worker_gpus,
        token_secret=token_secret,
        host_path=host_path,
    )
    click.echo(yaml.safe_dump(resource, sort_keys=False), nl=False)
