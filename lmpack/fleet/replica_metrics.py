"""lmpack's metrics of each replica, added to Ray's own: every few seconds a replica copies the samples of its
server's Prometheus registry (runtime/metrics.py, what `lmpack serve` shows at /metrics) into Ray gauges.

Ray exports them with its own and Serve's metrics on each node's metrics port (`lmpack fleet head/join
--metrics-port`), named `ray_` + lmpack's sample name and tagged with the model, its version, the replica and
the node, so one Prometheus scrape per node sees every replica on it.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

log = logging.getLogger("lmpack.fleet")

COPY_INTERVAL_S = 5.0
_NAME_RE = re.compile(r"[^a-zA-Z0-9_]")


class RayMirror:
    def __init__(self, registry: Any, tags: dict[str, str], *, interval: float = COPY_INTERVAL_S):
        self.registry = registry
        self.tags = tags
        self.interval = interval
        self.gauges: dict[str, Any] = {}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="lmpack-ray-metrics", daemon=True)

    def start(self) -> RayMirror:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()

    def _run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.copy()
            except Exception:  # a metric must never take the replica down
                log.exception("could not copy lmpack's metrics to Ray's")

    def copy(self) -> None:
        from ray.util.metrics import Gauge

        for family in self.registry.collect():
            for sample in family.samples:
                name = _NAME_RE.sub("_", sample.name)
                labels = {_NAME_RE.sub("_", k): str(v) for k, v in sample.labels.items()}
                gauge = self.gauges.get(name)
                if gauge is None:
                    keys = tuple(sorted({*labels, *self.tags}))
                    gauge = self.gauges[name] = Gauge(name, family.documentation or name, tag_keys=keys)
                gauge.set(float(sample.value), tags={**labels, **self.tags})
