"""A fleet command's connection to the Ray cluster, its nodes, and work run on each of them.

A fleet command runs on one of the nodes (Ray's drivers attach to their host's node) with the cluster's
token; it never starts a cluster of its own by accident (`ray.init` with an address only attaches).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmpack.errors import FleetError
from lmpack.fleet.token import check_token_file, ray_auth_env

DEFAULT_PORT = 6379  # Ray's GCS port on the head, the one address a joining node or a command needs
NAMESPACE = "lmpack"  # Ray namespace of the fleet's named actors
HEAD_RESOURCE = "node:__internal_head__"  # Ray's resource that only the head node has
CONNECT_TIMEOUT_S = 5.0
HEAD_FILE = "fleet-head.json"  # in lmpack's config home: the head this host's node belongs to


def fleet_env(token_file: Path) -> dict[str, str]:
    """The environment of every Ray process lmpack starts: the token, and Ray's usage reports off."""
    return {**ray_auth_env(token_file), "RAY_USAGE_STATS_ENABLED": "0"}


def split_address(address: str, default_port: int) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep:
        return address, default_port
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise FleetError(f"{address!r} is not HOST:PORT") from None


def check_reachable(host: str, port: int, *, what: str = "the head") -> None:
    """A TCP connection to HOST:PORT, so an unreachable head is named in seconds rather than after Ray's retries."""
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            return
    except OSError as exc:
        raise FleetError(
            f"cannot reach {what} at {host}:{port}: {exc.strerror or exc}",
            hint="check the address, that `lmpack fleet head` runs there, and the firewall between the nodes",
        ) from None


def _head_file() -> Path:
    from lmpack.config.paths import config_home

    return config_home() / HEAD_FILE


def remember_head(address: str) -> None:
    """Note the fleet's head on this host (`fleet head`/`join`): later commands here need no --address."""
    from lmpack.fsio import publish

    path = _head_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    publish(path, lambda staging: staging.write_text(json.dumps({"head": address}) + "\n"))


def remembered_head() -> str | None:
    try:
        return str(json.loads(_head_file().read_text())["head"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def local_address_towards(host: str, port: int) -> str:
    """The address of this host's interface that reaches HOST:PORT (no packet is sent)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((host, port))
        return str(probe.getsockname()[0])


@contextlib.contextmanager
def connected(address: str | None, token_file: Path | None) -> Iterator[None]:
    """Attach this process to the fleet at `address` (HOST:PORT of the head; None: the head this host joined, as
    `fleet head`/`join` noted it, else Ray's own search for a local cluster)."""
    token = check_token_file(token_file)
    address = address or remembered_head()
    os.environ.update(fleet_env(token))  # before Ray is imported: a process that imported it first kept no token
    import ray

    options: dict[str, Any] = {}
    if address is not None:
        head = split_address(address, DEFAULT_PORT)
        check_reachable(*head)
        # This process's address as the other nodes must reach it (the objects it puts live with it). Ray would
        # take the one that routes to 8.8.8.8, and on a network without a default route (air-gapped sites) falls
        # back to the host name's, often 127.0.1.1: the tasks given its objects then wait forever.
        options["_node_ip_address"] = local_address_towards(*head)
    try:
        ray.init(
            address=address or "auto",
            namespace=NAMESPACE,
            logging_level=logging.WARNING,
            log_to_driver=False,
            configure_logging=False,
            **options,
        )
    except ConnectionError as exc:
        where = address or "this node's cluster"
        hint = (
            "the head answers on its port, so its token most likely differs from "
            f"{token}: every node and client needs the same token file"
            if address is not None
            else "start or join one first: `lmpack fleet head` or `lmpack fleet join HEAD:PORT`"
        )
        raise FleetError(f"could not attach to the Ray cluster at {where}: {exc}", hint=hint) from None
    except RuntimeError as exc:  # Ray's version check between this process and the cluster
        raise FleetError(f"could not attach to the Ray cluster: {exc}") from None
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # its INFO lines would bury the command's output
    # Ray prints the cluster's news (a node marked dead, say) on this process's stdout, from a thread of its
    # own; stdout belongs to the command's output (--json above all), so while attached that goes to stderr.
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        ray.shutdown()


@dataclass(frozen=True)
class Node:
    node_id: str
    address: str
    head: bool
    cpus: float
    memory_bytes: int
    gpus: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "address": self.address,
            "head": self.head,
            "cpus": self.cpus,
            "memory_bytes": self.memory_bytes,
            "gpus": self.gpus,
        }


def alive_nodes() -> list[Node]:
    """The cluster's alive nodes, the head first, then by address."""
    import ray

    nodes = [
        Node(
            node_id=n["NodeID"],
            address=n["NodeManagerAddress"],
            head=HEAD_RESOURCE in n.get("Resources", {}),
            cpus=float(n["Resources"].get("CPU", 0)),
            memory_bytes=int(n["Resources"].get("memory", 0)),
            gpus=float(n["Resources"].get("GPU", 0)),
        )
        for n in ray.nodes()
        if n.get("Alive")
    ]
    return sorted(nodes, key=lambda n: (not n.head, n.address, n.node_id))


def on_node(node: Node, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) as a Ray task pinned to `node` (no CPU reserved); its ObjectRef. An ObjectRef among `args` is
    fetched by that node itself, from wherever it lives."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(fn)
    return task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False)).remote(*args)


def on_each_node(nodes: list[Node], fn: Callable[..., Any], *args: Any) -> dict[str, Any]:
    """Run fn(*args) once on each node; node id -> its result, or the exception it raised (a node's failure is
    its own, the others' results still count)."""
    import ray

    refs = {node.node_id: on_node(node, fn, *args) for node in nodes}
    results: dict[str, Any] = {}
    for node_id, ref in refs.items():
        try:
            results[node_id] = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            results[node_id] = exc.cause if isinstance(exc.cause, BaseException) else exc
        except ray.exceptions.RayError as exc:
            results[node_id] = FleetError(f"the node did not run the task: {type(exc).__name__}")
    return results
