"""`lmpack fleet manifest`: the same fleet for sites that run Kubernetes, as a KubeRay `RayService`.

KubeRay's operator starts the Ray pods and deploys `serveConfigV2`, whose application is built on the cluster
by `app` below (its import path), from the same DeployRequest as `lmpack fleet deploy`: the same replica, the
same sizes, autoscaling and surge. The release is read from the install prefix mounted into every pod (a host
path where `lmpack install` put it, by default), and, with `--token-secret`, Ray's token from a Kubernetes Secret.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmpack.config.serve import ServeSettings, serve_setting
from lmpack.fleet.deploy import DeployRequest, application

IMPORT_PATH = "lmpack.fleet.kuberay:app"
TOKEN_MOUNT = "/etc/lmpack/fleet"  # where the Secret's `token` key is mounted in each pod
SETTINGS = ("threads", "max_concurrency", "max_batch", "queue", "api_key_file", "served_model_name", "variant")


def app(args: dict[str, Any]) -> Any:
    """Ray Serve's application builder (serveConfigV2 `import_path`): the fleet's application from `args`."""
    return application(request_from_args(args))


def request_from_args(args: dict[str, Any]) -> DeployRequest:
    settings: dict[str, Any] = {}
    for name, value in (args.get("settings") or {}).items():
        kind = serve_setting(name).kind
        settings[name] = Path(value) if kind is Path else tuple(value) if kind is tuple else value
    return DeployRequest(
        name=args["name"],
        version=args["version"],
        prefix=Path(args["prefix"]),
        replicas=int(args.get("replicas", 1)),
        max_replicas=args.get("max_replicas"),
        replicas_per_node=int(args.get("replicas_per_node", 1)),
        gpus_per_replica=float(args.get("gpus_per_replica", 0)),
        settings=ServeSettings(**settings),
    )


def request_args(request: DeployRequest) -> dict[str, Any]:
    """The builder's `args` for `request` (the settings `deploy` takes as flags, where they differ from the default)."""
    default = ServeSettings()
    settings = {}
    for name in SETTINGS:
        value = getattr(request.settings, name)
        if value != getattr(default, name):
            settings[name] = (
                str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
            )
    return {
        "name": request.name,
        "version": request.version,
        "prefix": str(request.prefix),
        "replicas": request.replicas,
        "max_replicas": request.max_replicas,
        "replicas_per_node": request.replicas_per_node,
        "gpus_per_replica": request.gpus_per_replica,
        "settings": settings,
    }


def manifest(
    request: DeployRequest,
    *,
    image: str,
    workers: int,
    worker_cpus: int,
    worker_memory_gib: int,
    worker_gpus: int = 0,
    token_secret: str | None = None,
    host_path: Path | None = None,
) -> dict[str, Any]:
    """The RayService resource: a head pod without replicas (num-cpus 0) and `workers` worker pods."""
    import ray
    import yaml

    serve_config = {
        "http_options": {"host": "0.0.0.0", "port": request.http_port},
        "proxy_location": "EveryNode",
        "applications": [
            {"name": request.name, "route_prefix": "/", "import_path": IMPORT_PATH, "args": request_args(request)}
        ],
    }
    env = [{"name": "RAY_USAGE_STATS_ENABLED", "value": "0"}]
    mounts = [{"name": "lmpack-prefix", "mountPath": str(request.prefix), "readOnly": True}]
    volumes: list[dict[str, Any]] = [
        {"name": "lmpack-prefix", "hostPath": {"path": str(host_path or request.prefix), "type": "Directory"}}
    ]
    if token_secret:  # Ray's token authentication, the token from a Secret's `token` key
        env += [
            {"name": "RAY_AUTH_MODE", "value": "token"},
            {"name": "RAY_AUTH_TOKEN_PATH", "value": f"{TOKEN_MOUNT}/token"},
        ]
        mounts.append({"name": "fleet-token", "mountPath": TOKEN_MOUNT, "readOnly": True})
        volumes.append({"name": "fleet-token", "secret": {"secretName": token_secret, "defaultMode": 0o400}})
    ports = [{"containerPort": request.http_port, "name": "serve"}]

    def pod(name: str, resources: dict[str, Any]) -> dict[str, Any]:
        container: dict[str, Any] = {"name": name, "image": image, "env": env, "volumeMounts": mounts, "ports": ports}
        if resources:
            container["resources"] = {"requests": resources, "limits": resources}
        return {"spec": {"containers": [container], "volumes": volumes}}

    worker_resources: dict[str, Any] = {"cpu": str(worker_cpus), "memory": f"{worker_memory_gib}Gi"}
    if worker_gpus:
        worker_resources["nvidia.com/gpu"] = str(worker_gpus)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": request.name},
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config, sort_keys=False),
            "rayClusterConfig": {
                "rayVersion": ray.__version__,
                "headGroupSpec": {
                    # no replica on the head; its dashboard stays on: KubeRay deploys serveConfigV2 through it
                    "rayStartParams": {"num-cpus": "0"},
                    "template": pod("ray-head", {}),
                },
                "workerGroupSpecs": [
                    {
                        "groupName": "lmpack",
                        "replicas": workers,
                        "minReplicas": workers,
                        "maxReplicas": workers,
                        "rayStartParams": {},
                        "template": pod("ray-worker", worker_resources),
                    }
                ],
            },
        },
    }
