"""`lmpack doctor`: can this host run a bundle's variants, and which one would `lmpack serve` choose?"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from lmpack import api
from lmpack.cli.common import emit_json, handle_errors, json_option
from lmpack.errors import NoCompatibleVariantError

_GIB = 1 << 30


def render(report: dict[str, Any]) -> str:
    host = report["host"]
    gpus = ", ".join(f"{g['name']} (compute capability {g['compute_capability']}, {g['memory_bytes'] / _GIB:.1f} GiB)"
                     for g in host["gpus"]) or f"none ({host['gpu_note'] or 'none found'})"
    lines = [f"host:    {host['arch']}, {host['memory_bytes'] / _GIB:.1f} GiB memory",
             f"isa:     {_needed_isa(report)}",
             f"gpu:     {gpus}",
             f"{report['kind']}: {report['source']}", ""]
    for variant in report["variants"]:
        status = "ok" if variant["ok"] else "no: " + "; ".join(variant["reasons"])
        kind = "gpu" if variant["gpu"] else "cpu"
        lines.append(f"  {variant['name']}  [{variant['precision'] or '?'}, {kind}]  {status}")
    lines += ["", f"chosen:  {report['chosen'] or 'none: no variant can run on this host'}"]
    return "\n".join(lines)


def _needed_isa(report: dict[str, Any]) -> str:
    """Only the flags some variant asks for (with yes/no): the full list is in --json."""
    have = set(report["host"]["isa"])
    needed = sorted({i for v in report["variants"] if v["compatibility"] for i in v["compatibility"]["cpu"]["isa"]})
    named = ", ".join(f"{i} {'yes' if i in have else 'NO'}" for i in needed) or "no variant needs any"
    return f"{named} ({len(have)} flags in all)"


@click.command("doctor")
@click.argument("path", type=click.Path(path_type=Path))
@json_option
@handle_errors
def doctor_command(path: Path, as_json: bool) -> None:
    """Show this host's facts, whether each variant at PATH can run here, and which `lmpack serve` would choose.

    PATH is a variant directory, an unpacked bundle or an installed release. Exits 0 when a variant can
    run here and 17 when none can.

    \b
    Examples:
      lmpack doctor /opt/lmpack/releases/smollm2
      lmpack doctor bundle-dir --json
    """
    report = api.doctor(path)
    if as_json:
        emit_json(report)
    else:
        click.echo(render(report))
    if report["chosen"] is None:
        raise SystemExit(NoCompatibleVariantError.exit_code)
