"""`lmpack doctor`: can this host run a bundle's variants, and which one would `lmpack serve` choose?"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from lmpack import api
from lmpack.cli.common import emit_json, handle_errors, json_option
from lmpack.errors import NoCompatibleVariantError
from lmpack.runtime.host import onnxruntime_conflict

_GIB = 1 << 30


def render(report: dict[str, Any]) -> str:
    host = report["host"]
    gpus = (
        ", ".join(
            f"{g['name']} (compute capability {g['compute_capability']}, {g['memory_bytes'] / _GIB:.1f} GiB"
            f"{' shared with the CPU' if g.get('unified_memory') else ''})"
            for g in host["gpus"]
        )
        or f"none ({host['gpu_note'] or 'none found'})"
    )
    software = host.get("software") or {}
    lines = [
        f"host:    {host['arch']}, {host['memory_bytes'] / _GIB:.1f} GiB memory",
        f"isa:     {_needed_isa(report)}",
        f"gpu:     {gpus}",
        f"runtime: {_software(software)}",
    ]
    if (conflict := onnxruntime_conflict(tuple(software.get("onnxruntime_packages") or ()))) is not None:
        lines.append(f"warning: {conflict}")
    lines += [f"{report['kind']}: {report['source']}", ""]
    for variant in report["variants"]:
        status = "ok" if variant["ok"] else "no: " + "; ".join(variant["reasons"])
        kind = "gpu" if variant["gpu"] else "cpu"
        lines.append(f"  {variant['name']}  [{variant['precision'] or '?'}, {kind}]  {status}")
        if variant.get("engine"):
            lines += _engine_lines(variant["engine"])
    wanted = report.get("wanted")
    if report["chosen"]:
        chosen = report["chosen"] + (" (named by --variant)" if wanted else "")
    else:
        chosen = f"none: {wanted} cannot run on this host" if wanted else "none: no variant can run on this host"
    lines += ["", f"chosen:  {chosen}"]
    return "\n".join(lines)


def _software(software: dict[str, Any]) -> str:
    ort = software.get("onnxruntime_version")
    parts = [
        f"onnxruntime {ort} ({', '.join(software.get('providers') or []) or 'no providers'})"
        if ort
        else "onnxruntime not installed",
        f"TensorRT {software.get('tensorrt_version') or 'not found'}",
    ]
    if software.get("driver_version"):
        parts.append(f"driver {software['driver_version']} (CUDA {software.get('cuda_driver_version') or '?'})")
    return ", ".join(parts)


_MODES: dict[str | None, str] = {  # looked up with the plan's mode, which a document may lack
    "engine": "the shipped engine fits: TensorRT",
    "cached": "the engine this host rebuilt: TensorRT",
    "rebuild": "rebuild the engine here once, then TensorRT",
    "cuda": "FALLBACK to the CUDA provider",
    "cpu": "FALLBACK to the CPU",
    "refuse": "refused",
}


def _engine_lines(engine: dict[str, Any]) -> list[str]:
    """The shipped engine's facts, every mismatch, and what serve would do about them."""
    built = (
        f"{engine.get('gpu_name') or '?'} {engine.get('compute_capability') or '?'}, "
        f"TensorRT {engine.get('tensorrt_version') or '?'}, onnxruntime {engine.get('onnxruntime_version') or '?'}"
        + (", hardware-compatible" if engine.get("hardware_compatibility") == "ampere_plus" else "")
        + (", version-compatible" if engine.get("version_compatible") else "")
    )
    plan = engine.get("plan") or {}
    lines = [f"      engine: built for {built}"]
    lines += [f"      mismatch: {m}" for m in plan.get("mismatches", [])]
    lines.append(
        f"      plan:   {_MODES.get(plan.get('mode'), plan.get('mode'))}"
        + (f" (cache {engine['cache']})" if plan.get("mode") in ("cached", "rebuild") else "")
    )
    lines += [f"      note:   {n}" for n in plan.get("notes", [])]
    return lines


def _needed_isa(report: dict[str, Any]) -> str:
    """Only the flags some variant asks for (with yes/no): the full list is in --json."""
    have = set(report["host"]["isa"])
    needed = sorted({i for v in report["variants"] if v["compatibility"] for i in v["compatibility"]["cpu"]["isa"]})
    named = ", ".join(f"{i} {'yes' if i in have else 'NO'}" for i in needed) or "no variant needs any"
    return f"{named} ({len(have)} flags in all)"


@click.command("doctor")
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--variant",
    metavar="NAME",
    default=None,
    help="Judge as `lmpack serve --variant NAME` would: that variant is chosen if it can run here.",
)
@click.option("--strict", is_flag=True, help="Judge as `lmpack serve --strict` would: no CUDA or CPU fallback.")
@click.option(
    "--no-engine-rebuild", "no_engine_rebuild", is_flag=True, help="Judge as `lmpack serve --no-engine-rebuild` would."
)
@click.option(
    "--engine-cache-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Rebuilt engines' directory, as given to serve.",
)
@json_option
@handle_errors
def doctor_command(
    path: Path, variant: str | None, strict: bool, no_engine_rebuild: bool, engine_cache_dir: Path | None, as_json: bool
) -> None:
    """Show this host's facts, whether each variant at PATH can run here, and which `lmpack serve` would choose.

    PATH is a variant directory, an unpacked bundle or an installed release. A variant with a TensorRT
    engine also shows the engine's facts, every mismatch with this host and what serve would do (use
    it, rebuild it, fall back to CUDA or the CPU, or refuse). Exits 0 when a variant can run here and 17
    when none can (with --variant: when that one cannot).

    \b
    Examples:
      lmpack doctor /opt/lmpack/releases/smollm2
      lmpack doctor bundle-dir --json
      lmpack doctor /opt/lmpack/releases/smollm2 --variant smollm2-135m-instruct.q4-1-cpu-x86-int4
    """
    report = api.doctor(
        path, variant=variant, strict=strict, engine_rebuild=not no_engine_rebuild, engine_cache_dir=engine_cache_dir
    )
    if as_json:
        emit_json(report)
    else:
        click.echo(render(report))
    if report["chosen"] is None:
        raise SystemExit(NoCompatibleVariantError.exit_code)
