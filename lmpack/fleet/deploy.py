"""`lmpack fleet deploy`, `rollback` and `status`: one Ray Serve application per model, the release's
versions rolled replica by replica, and a ledger of what was deployed so a rollback knows where to go.

A new version rolls with one surge replica (Serve's max_surge_percent): an old replica stops only once its
replacement has warmed up, and a stopping replica drains its running requests first, so clients see no
failed request as long as the fleet has room for one more replica. A version that does not become healthy
within the timeout is replaced by the version that served before (an alert goes to the notifiers given),
and the deploy fails.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lmpack.config.serve import ServeSettings
from lmpack.errors import FleetError
from lmpack.fleet.cluster import HEAD_RESOURCE, NAMESPACE, alive_nodes
from lmpack.fleet.push import has_release, releases_by_node

LEDGER = "lmpack-fleet-ledger"
DEFAULT_HTTP_PORT = 8000
DEFAULT_TIMEOUT_S = 600.0
POLL_S = 1.0
SERVE_NAMESPACE = "serve"  # where Ray Serve keeps its actors, the replicas among them


@dataclass(frozen=True)
class DeployRequest:
    name: str
    version: str
    prefix: Path
    replicas: int = 1
    max_replicas: int | None = None  # None: fixed at `replicas`
    replicas_per_node: int = 1
    gpus_per_replica: float = 0.0
    scale_up_delay_s: float = 30.0  # Ray Serve's defaults: add replicas after a short queue, remove them slowly
    scale_down_delay_s: float = 600.0
    http_host: str = "0.0.0.0"
    http_port: int = DEFAULT_HTTP_PORT
    settings: ServeSettings = field(default_factory=ServeSettings)
    timeout_s: float = DEFAULT_TIMEOUT_S

    def check(self) -> None:
        if self.replicas < 1:
            raise FleetError("--replicas must be at least 1")
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise FleetError(f"--max-replicas ({self.max_replicas}) is below --replicas ({self.replicas})")


class Ledger:
    """The fleet's deploy history, per model: the requests that became healthy, oldest first; and where each
    replica runs, as the replica reported it once ready (Serve's status counts replicas but does not place
    them, and Ray's state API needs the dashboard). A detached actor on the head, so a command on any node
    sees it."""

    def __init__(self) -> None:
        self.history: dict[str, list[DeployRequest]] = {}
        self.replicas: dict[str, dict[str, str]] = {}

    def add(self, request: DeployRequest) -> None:
        self.history.setdefault(request.name, []).append(request)

    def get(self, name: str) -> list[DeployRequest]:
        return list(self.history.get(name, []))

    def names(self) -> list[str]:
        return sorted(self.history)

    def note_replica(self, actor_name: str, placed: dict[str, str]) -> None:
        self.replicas[actor_name] = placed

    def replicas_among(self, alive: set[str]) -> list[dict[str, str]]:
        """The replicas whose actors are still alive (by Serve's actor name); the others are forgotten."""
        self.replicas = {name: placed for name, placed in self.replicas.items() if name in alive}
        return list(self.replicas.values())


def ledger() -> Any:
    import ray

    return (
        ray.remote(Ledger)
        .options(
            name=LEDGER,
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            resources={HEAD_RESOURCE: 0.001},  # lives on the head, whose loss ends the fleet anyway
        )
        .remote()
    )


def deployed_releases() -> list[tuple[str, str]]:
    """(NAME, VERSION) of each model the fleet serves, from the ledger."""
    import ray

    book = ledger()
    return [(name, ray.get(book.get.remote(name))[-1].version) for name in ray.get(book.names.remote())]


def _missing_release(request: DeployRequest) -> list[str]:
    """The alive nodes that do not have NAME VERSION installed (a replica there could not start)."""
    nodes = alive_nodes()
    installed = releases_by_node(nodes, request.prefix)
    return [n.address for n in nodes if not has_release(installed[n.node_id], request.name, request.version)]


def _replica_memory(request: DeployRequest) -> int:
    """The memory a replica asks Ray for: the largest need among the release's variants (from its manifest)."""
    from lmpack.bundle.manifest import MANIFEST, parse_manifest
    from lmpack.bundle.releases import release_dir

    manifest_path = release_dir(request.prefix, request.name, request.version) / MANIFEST
    if not manifest_path.is_file():
        return 0  # not installed on this node: the scheduler then goes by CPUs only
    manifest = parse_manifest(manifest_path.read_bytes())
    return max((v.compatibility.min_memory_bytes for v in manifest.variants), default=0)


def application(request: DeployRequest) -> Any:
    """The Serve application (one deployment of LmpackReplica) for `request`: `deploy` runs it, and KubeRay builds
    it through kuberay.app."""
    from ray import serve

    from lmpack.fleet.replica import LmpackReplica, ReplicaSpec

    settings = request.settings
    actor_options: dict[str, Any] = {"num_cpus": settings.threads or 1}
    if memory := _replica_memory(request):
        actor_options["memory"] = memory
    if request.gpus_per_replica:
        actor_options["num_gpus"] = request.gpus_per_replica
    scaling: dict[str, Any] = (
        {"num_replicas": request.replicas}
        if request.max_replicas in (None, request.replicas)
        else {
            "autoscaling_config": {
                "min_replicas": request.replicas,
                "initial_replicas": request.replicas,
                "max_replicas": request.max_replicas,
                # a replica is full when its batch is: more waiting than that asks for another replica
                "target_ongoing_requests": max(1, min(settings.max_batch, settings.max_concurrency)),
                "upscale_delay_s": request.scale_up_delay_s,
                "downscale_delay_s": request.scale_down_delay_s,
            }
        }
    )
    deployment = serve.deployment(
        name=request.name,
        ray_actor_options=actor_options,
        max_replicas_per_node=request.replicas_per_node,
        # lmpack's own admission queues and answers 429 beyond these; Serve only has to hand them over
        max_ongoing_requests=settings.max_concurrency + settings.queue,
        graceful_shutdown_timeout_s=settings.drain_seconds,
        graceful_shutdown_wait_loop_s=1.0,
        health_check_period_s=5.0,
        health_check_timeout_s=30.0,
        max_surge_percent=1,  # rounds up to one extra replica: the old one stops once its successor is ready
        **scaling,
    )(LmpackReplica)
    return deployment.bind(ReplicaSpec(request.name, request.version, str(request.prefix), settings))


def deploy(
    request: DeployRequest,
    *,
    on_phase: Callable[[str], None] = lambda _: None,
    notify: Callable[[dict], None] | None = None,
) -> dict[str, Any]:
    """Deploy (or roll to) NAME VERSION; on failure, restore what served before and raise FleetError."""
    import ray
    from ray import serve

    request.check()
    if missing := _missing_release(request):
        raise FleetError(
            f"{request.name} {request.version} is not installed on {', '.join(missing)} under {request.prefix}",
            hint="lmpack fleet push BUNDLE (every alive node needs the release before a replica can start there)",
        )
    book = ledger()
    history = ray.get(book.get.remote(request.name))
    previous = history[-1] if history else None
    on_phase(
        f"deploying {request.name} {request.version}"
        + (f" over {previous.version}" if previous else "")
        + f" ({request.replicas}{'-' + str(request.max_replicas) if request.max_replicas else ''} replicas)"
    )
    serve.start(http_options={"host": request.http_host, "port": request.http_port}, proxy_location="EveryNode")
    started = time.monotonic()
    serve.run_many(
        [serve.RunTarget(application(request), name=request.name, route_prefix="/")],
        wait_for_applications_running=False,
    )
    problem = _wait_running(request, on_phase)
    if problem is None:
        ray.get(book.add.remote(request))
        return {
            "name": request.name,
            "version": request.version,
            "previous": previous.version if previous else None,
            "seconds": round(time.monotonic() - started, 1),
            "status": app_status(request.name),
        }
    event = {
        "alert": "fleet_deploy_failed",
        "state": "firing",
        "name": request.name,
        "version": request.version,
        "problem": problem,
        "restored": previous.version if previous else None,
    }
    if notify is not None:
        notify(event)
    if previous is None:
        serve.delete(request.name)
        raise FleetError(f"{request.name} {request.version} did not become healthy: {problem}; it was removed")
    on_phase(f"{request.version} did not become healthy ({problem}); restoring {previous.version}")
    back = replace(previous, timeout_s=request.timeout_s)
    serve.run_many(
        [serve.RunTarget(application(back), name=back.name, route_prefix="/")], wait_for_applications_running=False
    )
    restored = _wait_running(back, on_phase)
    raise FleetError(
        f"{request.name} {request.version} did not become healthy: {problem}; "
        + (
            f"{previous.version} serves again"
            if restored is None
            else f"restoring {previous.version} failed too: {restored}"
        ),
        hint="the replicas' logs are in each node's Ray session directory (logs/serve/)",
    )


def _wait_running(request: DeployRequest, on_phase: Callable[[str], None]) -> str | None:
    """None once the application runs NAME VERSION healthy; else what went wrong (failed, or the timeout)."""
    from ray import serve

    deadline = time.monotonic() + request.timeout_s
    last = ""
    while time.monotonic() < deadline:
        app = serve.status().applications.get(request.name)
        if app is not None:
            state = str(app.status.value)
            if state == "RUNNING":
                return None
            if state in ("DEPLOY_FAILED", "UNHEALTHY"):
                return f"{state}: {_deployment_message(app) or _first_line(app.message)}"
            if state != last:
                on_phase(f"{request.name}: {state.lower()}")
                last = state
        time.sleep(POLL_S)
    return f"not running after {request.timeout_s:.0f} s"


def _deployment_message(app: Any) -> str:
    """The deployments' own messages: a failed replica's exception is there, not in the application's."""
    return "; ".join(_last_line(d.message) for d in app.deployments.values() if d.message)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    return (lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}")[:600] if lines else ""


def _first_line(text: str) -> str:
    return (text or "").strip().splitlines()[0][:300] if (text or "").strip() else ""


def rollback(
    name: str, *, on_phase: Callable[[str], None] = lambda _: None, timeout_s: float = DEFAULT_TIMEOUT_S
) -> dict:
    """Deploy the version that served before the current one, with the settings it had."""
    import ray

    history = ray.get(ledger().get.remote(name))
    versions = [r.version for r in history]
    current = versions[-1] if versions else None
    earlier = [r for r in history if r.version != current]
    if not earlier:
        raise FleetError(f"{name} has no earlier version to roll back to (deployed: {', '.join(versions) or 'none'})")
    return deploy(replace(earlier[-1], timeout_s=timeout_s), on_phase=on_phase)


def note_replica(name: str, version: str) -> None:
    """Called by a replica once it is ready: the ledger learns its node for `fleet status`."""
    import ray
    from ray import serve

    replica_id = serve.get_replica_context().replica_id
    placed = {
        "model": name,
        "version": version,
        "replica": replica_id.unique_id,
        "node_id": ray.get_runtime_context().get_node_id(),
    }
    ledger().note_replica.remote(replica_id.to_full_id_str(), placed)


def _alive_replica_actors() -> set[str]:
    """The names of Serve's replica actors that are alive (Serve names each after its replica's full id)."""
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == SERVE_NAMESPACE}


def app_status(name: str) -> dict[str, Any]:
    from ray import serve

    app = serve.status().applications.get(name)
    if app is None:
        return {"status": "NOT_DEPLOYED"}
    return {
        "status": str(app.status.value),
        "message": _first_line(app.message),
        "deployments": {
            dep_name: {
                "status": str(d.status.value),
                "replicas": {str(getattr(k, "value", k)): v for k, v in d.replica_states.items()},
                "message": _first_line(d.message),
            }
            for dep_name, d in app.deployments.items()
        },
    }


def fleet_status(prefix: Path) -> dict[str, Any]:
    """Nodes (with their resources and installed releases), proxies, and every deployed model's state."""
    import ray
    from ray import serve

    book = ledger()
    alive = alive_nodes()
    installed = releases_by_node(alive, prefix)
    serve_status = serve.status()
    proxies = {node_id: str(getattr(p, "value", p)) for node_id, p in serve_status.proxies.items()}
    replicas = ray.get(book.replicas_among.remote(_alive_replica_actors()))
    nodes = []
    for node in alive:
        entry = node.to_dict()
        releases = installed[node.node_id]
        entry["releases"] = [] if isinstance(releases, BaseException) else releases
        entry["proxy"] = proxies.get(node.node_id)
        entry["replicas"] = sorted(
            ({k: v for k, v in r.items() if k != "node_id"} for r in replicas if r["node_id"] == node.node_id),
            key=lambda r: (r["model"], r["version"], r["replica"]),
        )
        nodes.append(entry)
    models = {}
    for name in ray.get(book.names.remote()):
        history = ray.get(book.get.remote(name))
        last = history[-1]
        models[name] = {
            "version": last.version,
            "history": [r.version for r in history],
            "replicas": last.replicas,
            "max_replicas": last.max_replicas,
            "http": f"{last.http_host}:{last.http_port}",
            **app_status(name),
        }
    return {"nodes": nodes, "models": models}
