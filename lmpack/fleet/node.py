"""`lmpack fleet head`, `join` and `leave`: Ray's `ray start` and `ray stop` with a fleet's safe defaults.

- Ray's token authentication on: the token file goes to every Ray process through its environment.
- Ray's usage statistics off; the dashboard only on request (it is an unauthenticated web UI).
- The node's address is the one given (Ray advertises it to the other nodes), never guessed.
- The node's CPUs, memory and object store are declared from the host (ray_sizes), so Ray never schedules
  more replicas on a node than its memory holds.
- The lmpack version of the head is recorded (ledger.py); a node with another version is refused at join.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from lmpack import __version__
from lmpack.errors import FleetError
from lmpack.fleet.cluster import DEFAULT_PORT, check_reachable, connected, fleet_env, remember_head, split_address
from lmpack.fleet.token import check_token_file

GIB = 1024**3
OBJECT_STORE_SHARE = 0.2  # of the host's memory: room for a bundle in transit (Ray spills beyond it)
MIN_OBJECT_STORE = GIB // 2
MAX_OBJECT_STORE = 16 * GIB
MEMORY_RESERVE = GIB  # left to the OS, the node's own Ray processes and lmpack agent


@dataclass(frozen=True)
class NodeSizes:
    """What the node offers Ray's scheduler."""

    cpus: int
    memory_bytes: int
    object_store_bytes: int

    @classmethod
    def of_host(cls, cpus: int | None = None, memory_bytes: int | None = None) -> NodeSizes:
        import psutil

        total = int(psutil.virtual_memory().total)
        store = min(MAX_OBJECT_STORE, max(MIN_OBJECT_STORE, int(total * OBJECT_STORE_SHARE)))
        usable = max(GIB // 2, total - store - MEMORY_RESERVE)
        return cls(
            cpus=cpus or len(os.sched_getaffinity(0)),
            memory_bytes=min(memory_bytes, usable) if memory_bytes else usable,
            object_store_bytes=store,
        )


def _ray_executable() -> str:
    """The `ray` of the environment lmpack runs in: the nodes' workers run this same Python and lmpack."""
    beside = Path(sys.executable).parent / "ray"
    found = str(beside) if beside.exists() else shutil.which("ray")
    if found is None:
        raise FleetError(
            "Ray is not installed in this environment",
            hint="install lmpack's `fleet` extra: pip install 'lmpack[fleet]'",
        )
    return found


def check_port_free(host: str, port: int) -> None:
    """Refuse a head whose port is taken (or whose address is not this host's) before Ray tries."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        # as Ray's GCS binds (gRPC sets it): connections a crashed head left in TIME_WAIT do not hold the port,
        # a listening socket does. Without it a head restarted within a minute of a crash was refused.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise FleetError(
                f"cannot use {host}:{port} for the head: {exc.strerror or exc}",
                hint="another Ray head or program holds the port (--port), or the address is not this host's",
            ) from None


def start_args(
    *,
    address: str,
    sizes: NodeSizes,
    head_port: int | None = None,
    join: str | None = None,
    dashboard: bool = False,
    temp_dir: Path | None = None,
    metrics_port: int | None = None,
) -> list[str]:
    """`ray start`'s arguments for a head (head_port) or a node joining `join` (HOST:PORT)."""
    args = [_ray_executable(), "start", f"--node-ip-address={address}"]
    if head_port is not None:
        args += ["--head", f"--port={head_port}", "--disable-usage-stats"]
        args += (
            ["--include-dashboard=true", f"--dashboard-host={address}"] if dashboard else ["--include-dashboard=false"]
        )
    else:
        args += [f"--address={join}"]
    args += [
        f"--num-cpus={sizes.cpus}",
        f"--memory={sizes.memory_bytes}",
        f"--object-store-memory={sizes.object_store_bytes}",
        f"--labels=lmpack-version={__version__}",
    ]
    if temp_dir is not None:
        args.append(f"--temp-dir={temp_dir}")
    if metrics_port is not None:  # Ray's Prometheus endpoint on this node (Ray's, Serve's and lmpack's metrics)
        args.append(f"--metrics-export-port={metrics_port}")
    return args


def _ray_start(args: list[str], token_file: Path, what: str) -> None:
    env = {**os.environ, **fleet_env(token_file)}
    done = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        detail = " / ".join(lines[-3:]) if lines else f"exit {done.returncode}"
        raise FleetError(f"`ray start` could not start {what}: {detail}")


def start_head(
    *,
    address: str,
    token_file: Path | None,
    port: int = DEFAULT_PORT,
    sizes: NodeSizes | None = None,
    dashboard: bool = False,
    temp_dir: Path | None = None,
    metrics_port: int | None = None,
) -> dict:
    token = check_token_file(token_file)
    check_port_free(address, port)
    sizes = sizes or NodeSizes.of_host()
    _ray_start(
        start_args(
            address=address,
            sizes=sizes,
            head_port=port,
            dashboard=dashboard,
            temp_dir=temp_dir,
            metrics_port=metrics_port,
        ),
        token,
        "the head",
    )
    remember_head(f"{address}:{port}")
    return {"role": "head", "address": f"{address}:{port}", "lmpack": __version__, **asdict(sizes)}


def join(
    head: str,
    *,
    address: str,
    token_file: Path | None,
    sizes: NodeSizes | None = None,
    temp_dir: Path | None = None,
    metrics_port: int | None = None,
) -> dict:
    token = check_token_file(token_file)
    host, port = split_address(head, DEFAULT_PORT)
    check_reachable(host, port)
    sizes = sizes or NodeSizes.of_host()
    args = start_args(address=address, sizes=sizes, join=f"{host}:{port}", temp_dir=temp_dir, metrics_port=metrics_port)
    _ray_start(args, token, "this node")
    with connected(f"{host}:{port}", token):
        versions = _lmpack_versions()
    if others := sorted({v for v in versions if v != __version__}):
        leave()  # not --force: a raylet that stops in order leaves the fleet's node list at once
        raise FleetError(
            f"this node runs lmpack {__version__}, the fleet runs {', '.join(others)}; the node left again",
            hint="install the same lmpack release (the same bundle) on every node",
        )
    remember_head(f"{host}:{port}")
    return {"role": "worker", "address": address, "head": f"{host}:{port}", "lmpack": __version__, **asdict(sizes)}


def _lmpack_versions() -> list[str]:
    """The lmpack version each alive node declared when it started (its Ray label)."""
    import ray

    return [n.get("Labels", {}).get("lmpack-version", "unknown") for n in ray.nodes() if n.get("Alive")]


def leave(*, force: bool = False) -> None:
    """Stop this host's Ray processes: its replicas move to the other nodes (a head's loss ends the fleet)."""
    args = [_ray_executable(), "stop"] + (["--force"] if force else [])
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise FleetError(f"`ray stop` failed: {(done.stderr or done.stdout).strip()[-300:]}")
