"""`lmpack install`, `lmpack list`, `lmpack uninstall`: releases on an air-gapped host."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import click

from lmpack import api
from lmpack.bundle import install as installing
from lmpack.cli.common import emit_json, handle_errors, json_option, phase_printer, quiet_option

_prefix_option = click.option(
    "--prefix",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Install root (e.g. /opt/lmpack): releases live in PREFIX/releases/NAME/VERSION.",
)


@click.command("install")
@click.argument("bundle", type=click.Path(path_type=Path))
@_prefix_option
@click.option(
    "--public-key",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Require a valid manifest.sig made with this Ed25519 key.",
)
@click.option("--allow-downgrade", is_flag=True, help="Allow a version lower than the current one.")
@click.option(
    "--python",
    "python",
    default=None,
    help="Python that creates the release venv (default: the one running lmpack); must match the bundle's wheels.",
)
@click.option(
    "--systemd-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Also write lmpack-serve@.service (and a drop-in for this bundle) into this directory.",
)
@quiet_option
@json_option
@handle_errors
def install_command(bundle, prefix, public_key, allow_downgrade, python, systemd_dir, quiet, as_json) -> None:
    """Verify BUNDLE completely, then install it as the current release of its name.

    Nothing becomes visible before every file is checked; a bundle with wheels gets its own venv
    (RELEASE/venv, offline, hashes required) before `current` switches atomically; the previous
    release is kept. A host's install.toml can require signatures (docs/airgapped-install.md). Killed at
    any point, the prefix shows exactly the old or the new state.

    \b
    Examples:
      lmpack install smollm2-1.1.0.lmpack --prefix /opt/lmpack --public-key /etc/lmpack/release.pub
      lmpack install smollm2-1.0.0.lmpack --prefix /opt/lmpack --allow-downgrade
    """
    options = installing.InstallOptions(
        public_keys=(public_key,) if public_key else (),
        allow_downgrade=allow_downgrade,
        python=python,
        systemd_dir=systemd_dir,
    )
    on_phase = phase_printer("install", enabled=not (quiet or as_json))
    result = installing.install(bundle, prefix, options=options, on_phase=on_phase)
    if as_json:
        emit_json(asdict(result))
        return
    was = f" (was {result.previous})" if result.previous and result.previous != result.version else ""
    verb = {"installed": "installed", "switched": "switched to", "unchanged": "already current:"}[result.action]
    click.echo(
        f"{verb} {result.name} {result.version}{was}, signature {result.signature}, "
        f"{result.files} files, {result.bytes / 1e6:.1f} MB in {result.seconds:.1f} s"
    )
    click.echo(f"  {result.path}")


@click.command("list")
@_prefix_option
@click.option(
    "--agent",
    "agent_url",
    default=api.DEFAULT_AGENT_URL,
    show_default=True,
    help="Also show which version the agent at this address serves (skipped when no agent answers).",
)
@json_option
@handle_errors
def list_command(prefix, agent_url, as_json) -> None:
    """Installed releases, which one is current, and which one a running agent serves.

    `current` is what the next start serves; after `lmpack install` the agent keeps serving the version it
    served until `lmpack switch`, which SERVING shows.

    \b
    Example:
      lmpack list --prefix /opt/lmpack --json
    """
    releases = installing.list_releases(prefix)
    serving = api.agent_serving(prefix, url=agent_url)
    if as_json:
        emit_json({"prefix": str(prefix), "releases": [asdict(r) for r in releases], "serving": serving})
        return
    if not releases:
        click.echo(f"nothing installed in {prefix}")
        return
    click.echo(f"{'NAME':<24} {'VERSION':<12} {'CURRENT':<8} {'SERVING':<8} {'SIZE':>10}  {'SIGNED':<7} VARIANTS")
    for r in releases:
        size = f"{r.bytes / 1e6:.1f} MB" if not r.problem else "?"
        served = serving is not None and (serving["name"], serving["version"]) == (r.name, r.version)
        click.echo(
            f"{r.name:<24} {r.version:<12} {'*' if r.current else '':<8} {'*' if served else '':<8} {size:>10}  "
            f"{'yes' if r.signed else 'no':<7} {r.problem or ', '.join(r.variants)}"
        )


@click.command("uninstall")
@click.argument("name")
@click.argument("version")
@_prefix_option
@click.option("--force", is_flag=True, help="Also remove the current release (then nothing is current).")
@json_option
@handle_errors
def uninstall_command(name, version, prefix, force, as_json) -> None:
    """Remove one installed release (not the current one unless --force).

    \b
    Example:
      lmpack uninstall smollm2 1.0.0 --prefix /opt/lmpack
    """
    removed = installing.uninstall(prefix, name, version, force=force)
    if as_json:
        emit_json({"removed": asdict(removed)})
        return
    click.echo(f"removed {removed.name} {removed.version}{' (was current)' if removed.current else ''}")
