"""Runs a build plan step by step through the cache, reporting progress and timings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from lmpack.pipeline.cache import StepCache, cache_key, guard_disk_full
from lmpack.pipeline.digest import tree_sha256, tree_size
from lmpack.pipeline.step import Artifact, Step, StepContext


@dataclass
class StepRecord:
    step: str
    params: dict[str, Any]
    cached: bool
    seconds: float
    output_bytes: int | None
    metrics: dict[str, Any] = field(default_factory=dict)


EventHandler = Callable[[str, dict[str, Any]], None]


def _ignore(event: str, data: dict[str, Any]) -> None:
    pass


def run_step(step: Step, ctx: StepContext, source: Artifact, cache: StepCache) -> tuple[Artifact, StepRecord]:
    """Run one step through the cache; return its output artifact and a record for the report."""
    key = cache_key(step=step.name, params=vars(step.params), input_digest=source.digest,
                    target_digest=ctx.target.digest if step.uses_target and ctx.target else None,
                    tool_versions=step.tool_versions(), extra=step.cache_extra(ctx))
    started = time.perf_counter()
    entry = cache.get(key)
    cached = entry is not None
    if entry is None:
        staging = cache.staging(key)
        try:
            with guard_disk_full(staging):
                metrics = step.run(ctx, source, staging / "out")
                digest = tree_sha256(staging / "out") if step.writes_output else source.digest
        except BaseException:
            cache.discard(staging)
            raise
        entry = cache.commit(key, staging, {"step": step.name, "params": vars(step.params), "input": source.digest,
                                            "digest": digest, "metrics": metrics, "tools": step.tool_versions()})
    metrics = entry.meta["metrics"]
    if step.writes_output:
        artifact = Artifact(kind=step.produces, path=entry.output, digest=entry.meta["digest"], info=metrics)
        size = tree_size(entry.output)
    else:
        artifact, size = source, None
    step.finish(ctx, source, metrics)
    record = StepRecord(step=step.name, params=vars(step.params), cached=cached,
                        seconds=round(time.perf_counter() - started, 3), output_bytes=size, metrics=metrics)
    return artifact, record


def run_steps(steps: list[Step], ctx: StepContext, source: Artifact, cache: StepCache,
              on_event: EventHandler = _ignore) -> tuple[Artifact, list[StepRecord]]:
    records = []
    artifact = source
    for index, step in enumerate(steps, start=1):
        on_event("step-start", {"index": index, "total": len(steps), "step": step.name})
        artifact, record = run_step(step, ctx, artifact, cache)
        ctx.artifacts[step.name] = artifact
        records.append(record)
        on_event("step-done", {"index": index, "total": len(steps), "step": step.name,
                               "cached": record.cached, "seconds": record.seconds})
    return artifact, records
