"""`lmpack pull` and `lmpack build`."""

from __future__ import annotations

from pathlib import Path

import click

from lmpack import api
from lmpack.cli.common import StderrReporter, emit_json, handle_errors, json_option, phase_printer, quiet_option

_source_options = [
    click.option("--revision", default=None, help="Hub branch, tag or commit (resolved and recorded as a commit)."),
    click.option(
        "--allow-pickle",
        is_flag=True,
        help="Convert a pickle-only checkpoint (pytorch_model.bin) to safetensors once. Off by default.",
    ),
    click.option("--trust-remote-code", is_flag=True, help="Allow a model that needs its own Python code."),
    click.option(
        "--cache-dir",
        type=click.Path(path_type=Path),
        default=None,
        help="Step cache (default $LMPACK_CACHE or ~/.cache/lmpack).",
    ),
]


def source_options(func):
    for option in reversed(_source_options):
        func = option(func)
    return func


@click.command("pull")
@click.argument("model")
@source_options
@click.option(
    "-o", "--output", type=click.Path(path_type=Path), default=None, help="Also copy the clean model directory here."
)
@json_option
@handle_errors
def pull_command(model, revision, allow_pickle, trust_remote_code, cache_dir, output, as_json) -> None:
    """Fetch MODEL (Hub repo id, local directory or .gguf file) into the cache as a safetensors directory.

    \b
    Examples:
      lmpack pull HuggingFaceTB/SmolLM2-135M-Instruct --revision main
      lmpack pull ./SmolLM2-135M-Instruct.Q4_1.gguf -o smollm2-hf/
      HF_HUB_OFFLINE=1 lmpack pull sentence-transformers/all-MiniLM-L6-v2
    """
    result = api.pull(
        model,
        revision=revision,
        output=output,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        cache_dir=cache_dir,
    )
    if as_json:
        emit_json({"path": str(result.path), "cached": result.cached, "source": result.source})
        return
    source = result.source
    commit = f" @ {source['commit']}" if source.get("commit") else ""
    click.echo(
        f"pulled {source['kind']} {source['ref']}{commit} ({source['architecture']})"
        f"{' from cache' if result.cached else ''}"
    )
    click.echo(f"  -> {result.path}")


@click.command("build")
@click.argument("model")
@click.option("-t", "--target", required=True, help="Target name (lmpack targets list) or path to a target .toml.")
@click.option(
    "-p",
    "--profile",
    default=None,
    help="Profile name (lmpack profiles list) or .toml path; default: the target's default profile.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=Path("dist"),
    show_default=True,
    help="Directory that receives the variant directory.",
)
@click.option("--name", default=None, help="Variant directory name (default MODEL-TARGET-PROFILE).")
@click.option(
    "--allow-quality-loss",
    is_flag=True,
    help="Keep the result even when it fails the profile's quality gate (recorded in the report).",
)
@click.option(
    "--strict",
    is_flag=True,
    help="Fail when the source model itself looks broken (plain English read at perplexity over 100), "
    "instead of warning in the report.",
)
@click.option(
    "--no-memory-check",
    "memory_check",
    flag_value=False,
    default=True,
    help="Start even when the build looks to need more memory than is available (the estimate is refused "
    "with both numbers otherwise).",
)
@click.option(
    "--bundle",
    "bundle_spec",
    default=None,
    metavar="NAME:VERSION",
    help="Also pack the variant into OUTPUT/NAME-VERSION.lmpack (see lmpack pack).",
)
@click.option("--wheels", is_flag=True, help="With --bundle: ship the runtime wheelhouse and install.py too.")
@click.option(
    "--wheel-source",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    default=None,
    help="With --wheels: resolve wheels offline from this directory.",
)
@source_options
@quiet_option
@json_option
@handle_errors
def build_command(
    model,
    target,
    profile,
    output,
    name,
    allow_quality_loss,
    strict,
    memory_check,
    bundle_spec,
    wheels,
    wheel_source,
    revision,
    allow_pickle,
    trust_remote_code,
    cache_dir,
    quiet,
    as_json,
) -> None:
    """Optimize MODEL for a hardware target and write a verified variant directory.

    MODEL is a Hub repo id, a local Hugging Face directory or a .gguf file. Steps are cached, so
    building the same model for another target reuses the export.

    \b
    Examples:
      lmpack build ./SmolLM2-135M-Instruct.Q4_1.gguf --target cpu-x86 --profile int8 -o dist/
      lmpack build sentence-transformers/all-MiniLM-L6-v2 --target cpu-x86 --profile int8
      lmpack build ./my-model --target a100            # the target's default profile
      lmpack build ./model.gguf --target cpu-x86 --bundle smollm2:1.0.0 --wheels
      lmpack build ./model.gguf --target cpu-x86 --strict   # a broken source fails, not warns
    """
    bundle = api.BundleRequest.parse(bundle_spec, wheels=wheels, wheel_source=wheel_source) if bundle_spec else None
    reporter = StderrReporter(enabled=not (as_json or quiet))
    result = api.build(
        model,
        target=target,
        profile=profile,
        output_dir=output,
        name=name,
        revision=revision,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        allow_quality_loss=allow_quality_loss,
        strict=strict,
        memory_check=memory_check,
        cache_dir=cache_dir,
        on_event=reporter.event,
        progress=reporter.progress,
        bundle=bundle,
        on_phase=phase_printer("pack", enabled=reporter.enabled),
    )
    if as_json:
        emit_json(
            {
                "variant_dir": str(result.variant_dir),
                "report": result.report,
                **(
                    {
                        "bundle": {
                            "path": str(result.bundle.path),
                            "sha256": result.bundle.archive_sha256,
                            "bytes": result.bundle.archive_bytes,
                        }
                    }
                    if result.bundle
                    else {}
                ),
            }
        )
        return
    click.echo(api.render_report(result.report), nl=False)
    click.echo(f"variant:   {result.variant_dir}")
    if result.bundle:
        click.echo(f"bundle:    {result.bundle.path} (sha256 {result.bundle.archive_sha256})")
