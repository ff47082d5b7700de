"""The build report: what a plan's steps recorded, gathered into report.json, and its summary for people."""

from __future__ import annotations

import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lmpack import __version__
from lmpack.pipeline.digest import tree_size
from lmpack.pipeline.plan import PULL, BuildPlan
from lmpack.pipeline.runner import PlanResult
from lmpack.pipeline.step import StepContext

REPORT_SCHEMA_VERSION = 1


def build_report(plan: BuildPlan, result: PlanResult, ctx: StepContext, *, started: float) -> dict[str, Any]:
    """report.json's content; `started` is the build's time.perf_counter() at its start."""
    reference_bytes = tree_size(ctx.reference().path)
    final_bytes = tree_size(result.final.path)
    reference_onnx, final_onnx = _onnx_bytes(ctx.reference().path), _onnx_bytes(result.final.path)
    tools: dict[str, str] = {}
    for planned in plan.steps:
        tools.update(planned.step.tool_versions())
    pulled, exported, validated = result.record(PULL), result.record("export"), result.record("validate")
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "lmpack_version": __version__,
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": pulled.metrics if pulled else {},
        "target": plan.target.name,
        "profile": plan.profile.name,
        "precision": plan.profile.precision,
        "task": exported.metrics.get("task") if exported else None,
        "steps": [asdict(r) for r in result.records],
        "sizes": {
            "reference_bytes": reference_bytes,
            "model_bytes": final_bytes,
            "ratio": round(final_bytes / reference_bytes, 4),
            "reference_onnx_bytes": reference_onnx,
            "onnx_bytes": final_onnx,
            "onnx_ratio": round(final_onnx / reference_onnx, 4),
        },
        "fidelity": {
            "tokenizer": pulled.metrics.get("tokenizer") if pulled else None,
            "export_parity": exported.metrics.get("parity") if exported else None,
        },
        "quality": validated.metrics if validated else {},
        "quality_gate": asdict(plan.profile.quality),
        "tools": tools,
        "seconds": round(time.perf_counter() - started, 2),
    }


def _onnx_bytes(directory: Path) -> int:
    """Bytes of the ONNX graph and its external data, without tokenizer and side files."""
    return sum(p.stat().st_size for p in directory.iterdir() if p.name.endswith((".onnx", ".onnx.data", ".onnx_data")))


def render_report(report: dict[str, Any]) -> str:
    """The human summary written beside report.json and printed by `lmpack build`."""
    source = report["source"]
    lines = [
        f"lmpack {report['lmpack_version']} build report",
        f"source:    {source.get('kind')} {source.get('ref')}"
        + (f" @ {source['commit']}" if source.get("commit") else "")
        + (f" (license {source['license']})" if source.get("license") else ""),
        f"target:    {report['target']}   profile: {report['profile']} ({report['precision']})",
        f"task:      {report['task']}",
        "steps:",
    ]
    for step in report["steps"]:
        size = f"{step['output_bytes'] / 1e6:9.1f} MB" if step["output_bytes"] else " " * 12
        lines.append(f"  {step['step']:<10} {step['seconds']:8.1f} s {size}{'  (cached)' if step['cached'] else ''}")
    sizes = report["sizes"]
    export = (report.get("fidelity", {}).get("export_parity") or {}).get("graph", "fp32")
    lines.append(
        f"size:      ONNX {sizes['onnx_bytes'] / 1e6:.1f} MB, {sizes['onnx_ratio']:.1%} of the {export} export "
        f"({sizes['reference_onnx_bytes'] / 1e6:.1f} MB); with tokenizer and side files "
        f"{sizes['model_bytes'] / 1e6:.1f} MB"
    )
    lines.extend(_fidelity_lines(report.get("fidelity", {})))
    quality = report["quality"]
    if "perplexity" in quality:
        lines.append(
            f"quality:   perplexity {quality['perplexity']:.3f} vs {quality['perplexity_reference']:.3f} "
            f"({quality['perplexity_increase']:+.2%}), top-1 agreement {quality['top1_agreement']:.3f}, "
            f"KL mean {quality['kl_mean']:.4f} (p99 {quality['kl_p99']:.4f}), gate {quality.get('gate')}"
        )
        for domain, numbers in quality.get("domains", {}).items():
            lines.append(
                f"  {domain:<13} {numbers['tokens']:5d} tokens  perplexity {numbers['perplexity']:9.3f} "
                f"({numbers['perplexity_increase']:+.2%})  top-1 {numbers['top1_agreement']:.3f}  "
                f"KL {numbers['kl_mean']:.4f}"
            )
        sanity = quality.get("sanity")
        if sanity and not sanity["ok"]:
            lines.append(
                f"WARNING:   the source model reads plain English at perplexity {sanity['perplexity_reference']:.1f} "
                f"(a working language model stays under {sanity['limit']:.0f}): its weights or tokenizer are "
                "likely broken; --strict makes this fail the build"
            )
    elif "cosine_similarity_mean" in quality:
        lines.append(
            f"quality:   cosine similarity mean {quality['cosine_similarity_mean']:.4f}, "
            f"min {quality['cosine_similarity_min']:.4f}, gate {quality.get('gate')}"
        )
    lines.append(f"total:     {report['seconds']:.1f} s")
    return "\n".join(lines) + "\n"


def _fidelity_lines(fidelity: dict[str, Any]) -> list[str]:
    lines = []
    tokenizer, parity = fidelity.get("tokenizer"), fidelity.get("export_parity")
    if tokenizer and "tokens" in tokenizer:
        lines.append(f"tokenizer: the source's own ids on {tokenizer['tokens']} tokens ({tokenizer['reference']})")
    elif tokenizer:
        lines.append(f"tokenizer: checked against {tokenizer['reference']}")
    if parity:
        lines.append(
            f"export:    {parity.get('graph', 'fp32')} ONNX vs {parity['reference']}: largest difference "
            f"{parity['max_abs_diff']:.2g} over "
            f"{parity['tokens']} tokens (tolerance {parity['tolerance']:g})"
        )
    return lines
