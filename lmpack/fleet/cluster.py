"""A fleet command's connection to the Ray cluster, its nodes, and work run on each of them.

A fleet command runs on one of the nodes (Ray's drivers attach to their host's node) with the cluster's
token; it never starts a cluster of its own by accident (`ray.init` with an address only attaches).
"""

from __future__ import annotations

import contextlib
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

NAMESPACE = "lmpack"  # Ray namespace of the fleet's named actors
HEAD_RESOURCE = "node:__internal_head__"  # Ray's resource that only the head node has
CONNECT_TIMEOUT_S = 5.0


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


@contextlib.contextmanager
def connected(address: str | None, token_file: Path | None) -> Iterator[None]:
    """Attach this process to the fleet at `address` (HOST:PORT of the head; None: the one this node belongs to)."""
    token = check_token_file(token_file)
    os.environ.update(fleet_env(token))
    import ray

    if address is not None:
        check_reachable(*split_address(address, 6379))
    try:
        ray.init(
            address=address or "auto",
            namespace=NAMESPACE,
            logging_level=logging.WARNING,
            log_to_driver=False,
            configure_logging=False,
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


def on_each_node(nodes: list[Node], fn: Callable[..., Any], *args: Any) -> dict[str, Any]:
    """Run fn(*args) once on each node (a Ray task pinned to it, no CPU reserved); node id -> its result, or
    the exception it raised (a node's failure is its own, the others' results still count)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(fn)
    refs = {
        node.node_id: task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False)).remote(
            *args
        )
        for node in nodes
    }
    results: dict[str, Any] = {}
    for node_id, ref in refs.items():
        try:
            results[node_id] = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            results[node_id] = exc.cause if isinstance(exc.cause, BaseException) else exc
        except ray.exceptions.RayError as exc:
            results[node_id] = FleetError(f"the node did not run the task: {type(exc).__name__}")
    return results
