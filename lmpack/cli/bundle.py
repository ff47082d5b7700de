"""`lmpack pack`, `lmpack verify`, `lmpack keygen`, `lmpack sign`: make and check bundles."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import click

from lmpack.bundle import pack as packing
from lmpack.bundle import signing, verify
from lmpack.bundle.wheels import OPTIONAL_EXTRAS
from lmpack.cli.common import emit_json, handle_errors, json_option, phase_printer, quiet_option

_key_path = click.Path(path_type=Path, dir_okay=False)


@click.command("pack")
@click.argument("variant_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="The bundle tarball to write, e.g. NAME-VERSION.lmpack.",
)
@click.option("--name", required=True, help="Bundle name: letters, digits, '.', '_', '-'.")
@click.option(
    "--version",
    "bundle_version",
    required=True,
    help="Bundle version MAJOR.MINOR.PATCH; installs refuse to go down without --allow-downgrade.",
)
@click.option(
    "--keep-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Also keep the unpacked bundle directory here.",
)
@click.option(
    "--wheels",
    is_flag=True,
    help="Also ship the runtime wheelhouse (lmpack + its runtime extra, binary wheels for the target's "
    "platform and Python), its hash lock, install.py and an SBOM. Needs pip's package index.",
)
@click.option(
    "--wheel-source",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    default=None,
    help="With --wheels: resolve from this local wheel directory only (pip --no-index --find-links), "
    "ignoring the host's pip configuration.",
)
@click.option(
    "--extra",
    "extras",
    multiple=True,
    type=click.Choice(OPTIONAL_EXTRAS),
    help="With --wheels: also ship this extra of lmpack's and its dependencies (fleet: Ray Serve, for lmpack fleet).",
)
@quiet_option
@json_option
@handle_errors
def pack_command(
    variant_dirs, output, name, bundle_version, keep_dir, wheels, wheel_source, extras, quiet, as_json
) -> None:
    """Pack variant directories (written by lmpack build) into one deterministic bundle.

    The same input always gives the same bytes: sorted members, fixed times, owners and modes.

    \b
    Examples:
      lmpack pack dist/smollm2-cpu-x86-int8 -o smollm2-1.0.0.lmpack --name smollm2 --version 1.0.0
      lmpack pack dist/*-int8 -o chat.lmpack --name chat --version 2.1.0 --keep-dir chat-bundle/
      lmpack pack dist/smollm2-cpu-x86-int8 -o smollm2.lmpack --name smollm2 --version 1.0.0 --wheels
      lmpack pack dist/smollm2-cpu-x86-int8 -o smollm2.lmpack --name smollm2 --version 1.0.0 --wheels --extra fleet
    """
    if (wheel_source is not None or extras) and not wheels:
        raise click.UsageError("--wheel-source and --extra need --wheels")
    options = packing.WheelOptions(source=wheel_source, extras=tuple(extras)) if wheels else None
    result = packing.pack(
        list(variant_dirs),
        output,
        name=name,
        version=bundle_version,
        keep_dir=keep_dir,
        wheels=options,
        on_phase=phase_printer("pack", enabled=not (quiet or as_json)),
    )
    if as_json:
        emit_json(asdict(result))
        return
    click.echo(
        f"packed {result.name} {result.version}: {len(result.variants)} variant(s), {result.files} files, "
        f"{result.bytes / 1e6:.1f} MB -> {result.archive_bytes / 1e6:.1f} MB in {result.seconds:.1f} s"
    )
    if result.wheelhouse:
        click.echo(
            f"  wheelhouse: {result.wheelhouse['wheels']} wheels, {result.wheelhouse['bytes'] / 1e6:.1f} MB "
            f"for {result.wheelhouse['platform_tag']}, Python {result.wheelhouse['python']}"
        )
    click.echo(f"  {result.path}  sha256 {result.archive_sha256}")
    if result.directory:
        click.echo(f"  {result.directory}/")


@click.command("verify")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option(
    "--public-key",
    type=_key_path,
    default=None,
    help="Check manifest.sig with this Ed25519 public key (required to trust a signature).",
)
@json_option
@handle_errors
def verify_command(bundle, public_key, as_json) -> None:
    """Check a bundle offline: every file hashed against the manifest, and its signature with --public-key.

    BUNDLE is a .lmpack tarball, an unpacked bundle directory or an installed release. Exit code 0 only
    when everything holds; 13 names every file that is missing, extra, truncated or altered.

    \b
    Examples:
      lmpack verify smollm2-1.0.0.lmpack --public-key release.pub
      lmpack verify /opt/lmpack/releases/smollm2/current
    """
    report = verify.verify_bundle(bundle, public_key=public_key)
    if as_json:
        emit_json({**asdict(report), "ok": True})
        return
    click.echo(
        f"ok: {report.name} {report.version} ({report.form}), {report.files} files, "
        f"{report.bytes / 1e6:.1f} MB, signature {report.signature}, {report.seconds:.1f} s"
    )


@click.command("keygen")
@click.option(
    "-o",
    "--output",
    "base",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Key base name: writes BASE.key (private, mode 0600) and BASE.pub.",
)
@json_option
@handle_errors
def keygen_command(base, as_json) -> None:
    """Make an Ed25519 signing key pair. Keep BASE.key on the build host; copy BASE.pub to the servers.

    \b
    Example:
      lmpack keygen -o keys/release
    """
    private, public, key_id = signing.keygen(base)
    if as_json:
        emit_json({"private_key": str(private), "public_key": str(public), "key_id": key_id})
        return
    click.echo(f"key {key_id}: private {private} (keep secret), public {public}")


@click.command("sign")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--key", required=True, type=_key_path, help="Ed25519 private key (BASE.key from lmpack keygen).")
@quiet_option
@json_option
@handle_errors
def sign_command(bundle, key, quiet, as_json) -> None:
    """Sign a bundle's manifest (after checking every file); writes manifest.sig into the bundle.

    A tarball is rewritten with the signature inside, so its sha256 changes: the new one is printed.

    \b
    Example:
      lmpack sign smollm2-1.0.0.lmpack --key keys/release.key
    """
    result = packing.sign_bundle(bundle, key, on_phase=phase_printer("sign", enabled=not (quiet or as_json)))
    if as_json:
        emit_json(asdict(result))
        return
    click.echo(f"signed {result.name} {result.version} with key {result.key_id}: {result.path}")
    if result.archive_sha256:
        click.echo(f"  {result.path}  sha256 {result.archive_sha256} (new: signing rewrote the file)")
