"""The Ray Serve replica: lmpack's own engine and HTTP app, one per replica, behind Ray Serve's proxies.

Each replica loads the release from its node's install prefix (put there by `lmpack fleet push`), picks the
variant for its node as `lmpack serve` and `lmpack doctor` do, and answers with the same Starlette app as
`lmpack serve` (runtime/server.py): the same routes, streaming, errors, limits and API keys. Ray Serve's
proxy forwards each HTTP request to a replica as ASGI; what Serve adds is the balancing between replicas.

The replica warms up in its constructor, so Serve puts it in rotation only once it can answer: a rolling
upgrade never sends a request to a replica that would say 503.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import serve

from lmpack.config.serve import ServeSettings
from lmpack.fleet.deploy import note_replica

log = logging.getLogger("lmpack.fleet")


@dataclass(frozen=True)
class ReplicaSpec:
    """What a replica serves: NAME VERSION from PREFIX on its node, with `lmpack serve`'s settings."""

    name: str
    version: str
    prefix: str
    settings: ServeSettings = field(default_factory=ServeSettings)


@serve.ingress()
class LmpackReplica:
    def __init__(self, spec: ReplicaSpec):
        from lmpack.bundle.releases import serving_release
        from lmpack.config import paths
        from lmpack.runtime.auth import load_api_keys
        from lmpack.runtime.server import create_app, load_for_serving

        settings = spec.settings
        engine = load_for_serving(serving_release(Path(spec.prefix), spec.name, spec.version), settings)
        self.spec = spec
        self.variant_name = engine.variant.name
        self._lmpack_app = create_app(
            engine, settings, api_keys=load_api_keys(settings.api_key_file, paths.api_keys_env()), warmup=False
        )
        state = self._lmpack_app.state.lmpack
        state.warm_up()  # before Serve routes here: a failure fails the replica, not a user's request
        self._mirror = self._mirror_metrics(state)
        note_replica(spec.name, spec.version)
        log.info("%s %s: replica ready with %s", spec.name, spec.version, self.variant_name)

    def _mirror_metrics(self, state: Any) -> Any:
        import ray

        from lmpack.fleet.replica_metrics import RayMirror

        if state.metrics.registry is None:  # prometheus-client is not installed: nothing to copy
            return None
        tags = {
            "model": self.spec.name,
            "version": self.spec.version,
            "replica": serve.get_replica_context().replica_id.unique_id,
            "node": ray.util.get_node_ip_address(),
        }
        return RayMirror(state.metrics.registry, tags).start()

    def __serve_build_asgi_app__(self) -> Any:
        return self._lmpack_app

    def check_health(self) -> None:
        """Serve's periodic health check: a replica whose server failed is replaced."""
        state = self._lmpack_app.state.lmpack
        if state.status == "failed":
            raise RuntimeError(f"{self.spec.name} {self.spec.version}: {state.status_reason}")
