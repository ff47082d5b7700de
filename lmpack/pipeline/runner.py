"""Runs a build plan step by step through the cache, reporting progress and timings."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from lmpack.pipeline.cache import StepCache, cache_key, guard_disk_full
from lmpack.pipeline.digest import tree_sha256, tree_size
from lmpack.pipeline.plan import BuildPlan
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


def ignore_events(event: str, data: dict[str, Any]) -> None:
    pass


def run_step(step: Step, ctx: StepContext, source: Artifact, cache: StepCache) -> tuple[Artifact, StepRecord]:
    """Run one step through the cache; return its output artifact and a record for the report."""
    key = cache_key(
        step=step.name,
        params=vars(step.params),
        input_digest=source.digest,
        target_digest=ctx.target.digest if step.uses_target and ctx.target else None,
        tool_versions=step.tool_versions(),
        extra=step.cache_extra(ctx),
    )
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
        entry = cache.commit(
            key,
            staging,
            {
                "step": step.name,
                "params": vars(step.params),
                "input": source.digest,
                "digest": digest,
                "metrics": metrics,
                "tools": step.tool_versions(),
            },
        )
    metrics = entry.meta["metrics"]
    if step.writes_output:
        artifact = Artifact(kind=step.produces, path=entry.output, digest=entry.meta["digest"], info=metrics)
        size = tree_size(entry.output)
    else:
        artifact, size = source, None
    step.finish(ctx, source, metrics)
    record = StepRecord(
        step=step.name,
        params=vars(step.params),
        cached=cached,
        seconds=round(time.perf_counter() - started, 3),
        output_bytes=size,
        metrics=metrics,
    )
    return artifact, record


@dataclass(frozen=True)
class PlanResult:
    """What a plan made: the last artifact of its chain and one record per step, in plan order."""

    final: Artifact
    records: list[StepRecord]

    def record(self, label: str) -> StepRecord | None:
        return next((r for r in self.records if r.step == label), None)


def run_plan(
    plan: BuildPlan, ctx: StepContext, source: Artifact, cache: StepCache, on_event: EventHandler = ignore_events
) -> PlanResult:
    """Every step of `plan` in order; each output is kept in `ctx.artifacts` under the step's label."""
    records = []
    artifact = source
    total = len(plan.steps)
    for index, planned in enumerate(plan.steps, start=1):
        on_event("step-start", {"index": index, "total": total, "step": planned.label})
        given = ctx.artifacts[planned.reads] if planned.reads is not None else artifact
        output, record = run_step(planned.step, ctx, given, cache)
        ctx.artifacts[planned.label] = output
        if not planned.aside:
            artifact = output
        records.append(replace(record, step=planned.label))
        on_event(
            "step-done",
            {"index": index, "total": total, "step": planned.label, "cached": record.cached, "seconds": record.seconds},
        )
    return PlanResult(final=artifact, records=records)
