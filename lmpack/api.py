"""The public library: every CLI command is one call into this module."""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lmpack import __version__
from lmpack.config import paths
from lmpack.config.profiles import Profile, list_profiles, load_profile
from lmpack.config.targets import Target, list_targets, load_target
from lmpack.fsio import publish
from lmpack.pipeline.cache import StepCache
from lmpack.pipeline.digest import tree_size
from lmpack.pipeline.plan import BuildPlan, make_plan
from lmpack.pipeline.runner import EventHandler, StepRecord, run_step, run_steps
from lmpack.pipeline.step import Artifact, ProgressFactory, StepContext, silent_progress
from lmpack.steps.pull import PullParams, PullStep, resolve_source

__all__ = ["targets", "target", "profiles", "profile", "plan", "pull", "build", "BuildResult", "PullResult"]

VARIANT_FILE = "variant.json"
REPORT_JSON = "report.json"
REPORT_TEXT = "report.txt"
MODEL_DIR = "model"


def targets() -> list[Target]:
    return list_targets()


def target(name_or_path: str) -> Target:
    return load_target(name_or_path)


def profiles() -> list[Profile]:
    return list_profiles()


def profile(name_or_path: str) -> Profile:
    return load_profile(name_or_path)


def plan(*, target: str, profile: str | None = None) -> BuildPlan:
    """The build plan for a target and profile (the target's default profile when none is given)."""
    chosen_target = load_target(target)
    return make_plan(chosen_target, load_profile(profile or chosen_target.default_profile))


@dataclass(frozen=True)
class PullResult:
    path: Path
    source: dict[str, Any]
    cached: bool


def _cache(cache_dir: Path | None) -> StepCache:
    return StepCache((cache_dir or paths.cache_dir()) / "steps")


def _pull(model: str, ctx: StepContext, cache: StepCache, *, revision: str | None, allow_pickle: bool,
          trust_remote_code: bool) -> tuple[Artifact, StepRecord]:
    source = resolve_source(model, revision=revision, allow_pickle=allow_pickle)
    step = PullStep(PullParams(allow_pickle=allow_pickle, trust_remote_code=trust_remote_code))
    return run_step(step, ctx, source, cache)


def pull(model: str, *, revision: str | None = None, output: Path | None = None, allow_pickle: bool = False,
         trust_remote_code: bool = False, cache_dir: Path | None = None) -> PullResult:
    """Fetch a model into the step cache as a clean Hugging Face directory; copy it to `output` if given."""
    cpu = load_target("cpu-x86")  # pulling does not depend on the target; the context needs one
    ctx = StepContext(target=cpu, profile=load_profile("fp32"))
    artifact, record = _pull(model, ctx, _cache(cache_dir), revision=revision, allow_pickle=allow_pickle,
                             trust_remote_code=trust_remote_code)
    path = artifact.path
    if output is not None:
        publish(Path(output), lambda staging: shutil.copytree(artifact.path, staging))
        path = Path(output)
    return PullResult(path=path, source=record.metrics, cached=record.cached)


@dataclass(frozen=True)
class BuildResult:
    variant_dir: Path
    report: dict[str, Any]


def build(model: str, *, target: str, profile: str | None = None, output_dir: Path = Path("dist"),
          name: str | None = None, revision: str | None = None, allow_pickle: bool = False,
          trust_remote_code: bool = False, allow_quality_loss: bool = False, cache_dir: Path | None = None,
          on_event: EventHandler | None = None, progress: ProgressFactory = silent_progress) -> BuildResult:
    """Pull, optimize and validate `model` for `target`; write one variant directory under `output_dir`.

    Everything is checked (target, profile, their pairing, the model path) before any work starts, and
    the variant directory appears only once complete.
    """
    started = time.perf_counter()
    build_plan = plan(target=target, profile=profile)
    events = on_event or (lambda event, data: None)
    ctx = StepContext(target=build_plan.target, profile=build_plan.profile, progress=progress,
                      options={"allow_quality_loss": allow_quality_loss})
    cache = _cache(cache_dir)
    total = len(build_plan.steps) + 1
    events("step-start", {"index": 1, "total": total, "step": "pull"})
    pulled, pull_record = _pull(model, ctx, cache, revision=revision, allow_pickle=allow_pickle,
                                trust_remote_code=trust_remote_code)
    events("step-done", {"index": 1, "total": total, "step": "pull", "cached": pull_record.cached,
                         "seconds": pull_record.seconds})
    ctx.artifacts["pull"] = pulled

    def renumber(event: str, data: dict[str, Any]) -> None:
        events(event, {**data, "index": data["index"] + 1, "total": total})

    final, records = run_steps(build_plan.steps, ctx, pulled, cache, on_event=renumber)
    variant_name = name or f"{_slug(pull_record.metrics)}-{build_plan.target.name}-{build_plan.profile.name}"
    report = _report(build_plan, pull_record, records, ctx, final, started)
    variant_dir = Path(output_dir) / variant_name
    publish(variant_dir, lambda staging: _write_variant(staging, variant_name, final, build_plan, report))
    return BuildResult(variant_dir=variant_dir, report=report)


def _slug(source: dict[str, Any]) -> str:
    ref = source.get("ref", "model")
    stem = Path(ref).name if source.get("kind") != "hub" else ref.split("/")[-1]
    stem = re.sub(r"\.gguf$", "", stem, flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9.]+", "-", stem.lower()).strip("-.") or "model"


def _write_variant(staging: Path, name: str, final: Artifact, build_plan: BuildPlan, report: dict[str, Any]) -> None:
    shutil.copytree(final.path, staging / MODEL_DIR)
    variant = {
        "schema_version": 1,
        "name": name,  # not staging.name: that is the hidden .partial directory
        "target": build_plan.target.to_dict(),
        "profile": build_plan.profile.name,
        "precision": build_plan.profile.precision,
        "execution_providers": build_plan.target.execution_providers,
        "task": report["task"],
        "model_digest": final.digest,
    }
    (staging / VARIANT_FILE).write_text(json.dumps(variant, indent=2, sort_keys=True))
    (staging / REPORT_JSON).write_text(json.dumps(report, indent=2, sort_keys=True))
    (staging / REPORT_TEXT).write_text(render_report(report))


def _report(build_plan: BuildPlan, pull_record: StepRecord, records: list[StepRecord], ctx: StepContext,
            final: Artifact, started: float) -> dict[str, Any]:
    reference_bytes = tree_size(ctx.reference().path) if "export" in ctx.artifacts else None
    final_bytes = tree_size(final.path)
    quality = next((r.metrics for r in records if r.step == "validate"), {})
    tools: dict[str, str] = {}
    for step in build_plan.steps:
        tools.update(step.tool_versions())
    export_metrics = next((r.metrics for r in records if r.step == "export"), {})
    return {
        "schema_version": 1,
        "lmpack_version": __version__,
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": pull_record.metrics,
        "target": build_plan.target.name,
        "profile": build_plan.profile.name,
        "precision": build_plan.profile.precision,
        "task": export_metrics.get("task"),
        "steps": [asdict(r) for r in [pull_record, *records]],
        "sizes": {"reference_bytes": reference_bytes, "model_bytes": final_bytes,
                  "ratio": round(final_bytes / reference_bytes, 4) if reference_bytes else None},
        "quality": quality,
        "quality_gate": asdict(build_plan.profile.quality),
        "tools": tools,
        "seconds": round(time.perf_counter() - started, 2),
    }


def render_report(report: dict[str, Any]) -> str:
    """The human summary written beside report.json and printed by `lmpack build`."""
    source = report["source"]
    lines = [f"lmpack {report['lmpack_version']} build report",
             f"source:    {source.get('kind')} {source.get('ref')}"
             + (f" @ {source['commit']}" if source.get("commit") else "")
             + (f" (license {source['license']})" if source.get("license") else ""),
             f"target:    {report['target']}   profile: {report['profile']} ({report['precision']})",
             f"task:      {report['task']}", "steps:"]
    for step in report["steps"]:
        size = f"{step['output_bytes'] / 1e6:9.1f} MB" if step["output_bytes"] else " " * 12
        lines.append(f"  {step['step']:<10} {step['seconds']:8.1f} s {size}{'  (cached)' if step['cached'] else ''}")
    sizes = report["sizes"]
    if sizes["reference_bytes"]:
        lines.append(f"size:      {sizes['model_bytes'] / 1e6:.1f} MB, {sizes['ratio']:.1%} of the fp32 export "
                     f"({sizes['reference_bytes'] / 1e6:.1f} MB)")
    quality = report["quality"]
    if "perplexity" in quality:
        lines.append(f"quality:   perplexity {quality['perplexity']:.3f} vs {quality['perplexity_reference']:.3f} "
                     f"({quality['perplexity_increase']:+.2%}), top-1 agreement {quality['top1_agreement']:.3f}, "
                     f"gate {quality.get('gate')}")
    elif "cosine_similarity_mean" in quality:
        lines.append(f"quality:   cosine similarity mean {quality['cosine_similarity_mean']:.4f}, "
                     f"min {quality['cosine_similarity_min']:.4f}, gate {quality.get('gate')}")
    lines.append(f"total:     {report['seconds']:.1f} s")
    return "\n".join(lines) + "\n"
