"""`lmpack targets` and `lmpack profiles`: what hardware and recipes lmpack knows."""

from __future__ import annotations

from dataclasses import asdict

import click

from lmpack import api
from lmpack.cli.common import emit_json, handle_errors, json_option


@click.group("targets")
def targets_group() -> None:
    """Hardware targets (targets/*.toml, plus your own in ~/.config/lmpack/targets)."""


@targets_group.command("list")
@json_option
@handle_errors
def targets_list(as_json: bool) -> None:
    """List known targets.

    \b
    Example:
      lmpack targets list --json
    """
    found = api.targets()
    if as_json:
        emit_json([t.to_dict() for t in found])
        return
    click.echo(f"{'NAME':<16} {'ARCH':<8} {'GPU':<14} {'CC':<4} {'PRECISIONS':<36} DEFAULT")
    for t in found:
        gpu = t.gpu.model if t.gpu else "-"
        cc = t.gpu.compute_capability if t.gpu else "-"
        click.echo(f"{t.name:<16} {t.cpu.arch:<8} {gpu:<14} {cc:<4} {','.join(t.precisions):<36} {t.default_profile}")


@targets_group.command("show")
@click.argument("target")
@json_option
@handle_errors
def targets_show(target: str, as_json: bool) -> None:
    """Show one target's facts and precision matrix.

    \b
    Examples:
      lmpack targets show a100
      lmpack targets show ./my-target.toml --json
    """
    t = api.target(target)
    if as_json:
        emit_json(t.to_dict())
        return
    click.echo(f"{t.name}: {t.description}")
    click.echo(f"  source:      {t.source}")
    click.echo(f"  cpu:         {t.cpu.arch} ({', '.join(t.cpu.isa) or 'baseline'}), host memory {t.memory_gib:g} GiB")
    if t.gpu:
        click.echo(
            f"  gpu:         {t.gpu.model}, compute capability {t.gpu.compute_capability}, {t.gpu.memory_gib:g} GiB"
        )
    click.echo(
        "  precisions:  "
        + "  ".join(
            f"{p}:{'yes' if p in t.precisions else 'no'}"
            for p in ("fp32", "tf32", "fp16", "bf16", "fp8", "int8", "int4")
        )
    )
    click.echo(f"  providers:   {', '.join(t.execution_providers)}")
    click.echo(f"  wheels:      {t.platform_tag}, Python {t.python}")
    click.echo(f"  sparsity:    {', '.join(t.sparsity) or 'none'}")
    if t.tensorrt:
        click.echo(f"  tensorrt:    {asdict(t.tensorrt)}")
    click.echo(f"  default profile: {t.default_profile}")


@click.group("profiles")
def profiles_group() -> None:
    """Optimization profiles (profiles/*.toml, plus your own in ~/.config/lmpack/profiles)."""


@profiles_group.command("list")
@json_option
@handle_errors
def profiles_list(as_json: bool) -> None:
    """List known profiles and their steps.

    \b
    Example:
      lmpack profiles list
    """
    found = api.profiles()
    if as_json:
        emit_json(
            [
                {
                    "name": p.name,
                    "description": p.description,
                    "precision": p.precision,
                    "steps": [{"name": s.name, **s.params} for s in p.steps],
                    "quality": asdict(p.quality),
                    "source": p.source,
                }
                for p in found
            ]
        )
        return
    click.echo(f"{'NAME':<14} {'PRECISION':<10} {'STEPS':<40} DESCRIPTION")
    for p in found:
        steps = " > ".join(s.name for s in p.steps)
        click.echo(f"{p.name:<14} {p.precision:<10} {steps:<40} {p.description}")


@profiles_group.command("show")
@click.argument("profile")
@click.option("--target", "target", default=None, help="Also check the profile against this target and show the plan.")
@json_option
@handle_errors
def profiles_show(profile: str, target: str | None, as_json: bool) -> None:
    """Show one profile; with --target, the build plan or why the pair is refused.

    \b
    Examples:
      lmpack profiles show int4
      lmpack profiles show fp16 --target t4
    """
    p = api.profile(profile)
    plan = api.plan(target=target, profile=profile).describe() if target else None
    if as_json:
        emit_json(
            {
                "name": p.name,
                "precision": p.precision,
                "steps": [{"name": s.name, **s.params} for s in p.steps],
                "quality": asdict(p.quality),
                "plan": plan,
            }
        )
        return
    click.echo(f"{p.name}: {p.description}  ({p.source})")
    for s in p.steps:
        click.echo(f"  - {s.name} {s.params or ''}")
    click.echo(f"  quality gate: {asdict(p.quality)}")
    if plan is not None:
        click.echo(f"  plan for {target}: " + " > ".join(f"{s['step']}{s['params']}" for s in plan))
