"""Offline install into versioned releases with an atomic `current` pointer (docs/airgapped-install.md).

The prefix's layout is releases.py's. A release is installed when it is `current` or has a marker; any
other version directory is the leftover of an interrupted install, invisible to `list` and removed by the
next install. Replacing
`current` is the single commit point, and the outgoing release is marked before it, so a kill at any
instant leaves what `list` reports exactly as before or exactly as after. Every file is verified in
staging before the release directory gets its name, and nothing reads the clock for validity.

Runtime-side: standard library, lmpack.errors, lmpack.fsio and lmpack.bundle only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from lmpack.bundle import releases as layout
from lmpack.bundle import runtime_env
from lmpack.bundle.manifest import MANIFEST, SIGNATURE, VERSION_RE, Manifest, check_name, parse_manifest, parse_version
from lmpack.bundle.signing import check_trusted
from lmpack.bundle.verify import Bundle, DirBundle, check_bundle, check_contents, open_bundle, raise_problems
from lmpack.config.install_policy import load_install_policy
from lmpack.errors import BundleError, DiskFullError, InstallError, NotFoundError
from lmpack.fsio import fsync_dir, guard_disk_full, remove_path
from lmpack.progress import PhaseReporter, megabytes, no_progress

_BLOCK = 4096


@dataclass(frozen=True)
class InstallResult:
    name: str
    version: str
    path: Path
    action: str  # installed | switched | unchanged
    previous: str | None
    signature: str
    files: int
    bytes: int
    seconds: float


@dataclass(frozen=True)
class Release:
    name: str
    version: str
    path: Path
    current: bool
    signed: bool = False
    variants: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    problem: str | None = None


# --- the prefix ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _writable(prefix: Path) -> Iterator[None]:
    """A read-only or foreign prefix is the user's to fix: say so instead of an internal error."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise InstallError(
                f"cannot write to {prefix}: {exc.strerror} ({exc.filename})",
                hint="choose a writable --prefix or run as its owner; nothing was changed",
            ) from exc
        raise


@contextlib.contextmanager
def _locked(prefix: Path) -> Iterator[None]:
    """One writer per prefix (flock on the directory itself: no lock file, released if the process dies)."""
    fd = os.open(prefix, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InstallError(
                f"another lmpack install or uninstall is running on {prefix}",
                hint="wait for it to finish and run again",
            ) from None
        yield
    finally:
        os.close(fd)


def _recover(prefix: Path) -> None:
    """Remove what an interrupted install or uninstall left (processes still writing, staging, temp links,
    uncommitted versions) and mark a current release that a kill left unmarked."""
    runtime_env.reap_children(prefix / layout.CHILDREN)
    remove_path(prefix / layout.STAGING)
    releases = prefix / layout.RELEASES
    if not releases.is_dir():
        return
    for name_dir in releases.iterdir():
        if name_dir.is_symlink() or not name_dir.is_dir():
            continue
        current = layout.current_version(name_dir)
        if current is not None and not layout.marker(name_dir, current).is_file():
            _touch(layout.marker(name_dir, current))  # killed just after the commit: finish its last step
        for entry in name_dir.iterdir():
            if entry.name.startswith(layout.TEMP_LINK):
                remove_path(entry)
            elif (
                VERSION_RE.match(entry.name)
                and not entry.is_symlink()
                and not layout.is_installed(name_dir, entry.name)
            ):
                remove_path(entry)


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
    fsync_dir(path.parent)


def _switch(name_dir: Path, version: str, previous: str | None) -> None:
    """Mark the outgoing release (so it stays listed), then replace `current` atomically: the commit."""
    if previous is not None:
        _touch(layout.marker(name_dir, previous))
    temp = name_dir / f"{layout.TEMP_LINK}{uuid.uuid4().hex[:8]}"
    os.symlink(version, temp)
    os.replace(temp, name_dir / layout.CURRENT)
    fsync_dir(name_dir)
    _touch(layout.marker(name_dir, version))


def _check_free_space(prefix: Path, manifest: Manifest) -> None:
    needed = manifest.total_bytes + (manifest.total_files + 8) * _BLOCK + (1 << 20)
    free = shutil.disk_usage(prefix).free
    if free < needed:
        raise DiskFullError(
            f"{prefix} has {free / 1e6:.1f} MB free; {manifest.name} {manifest.version} needs "
            f"{needed / 1e6:.1f} MB; nothing was written",
            hint="free some space or choose another --prefix",
        )


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_tree(root: Path) -> None:
    for directory, _, _ in os.walk(root):
        fsync_dir(Path(directory))


# --- install, list, uninstall ----------------------------------------------------------------------------


@dataclass(frozen=True)
class InstallOptions:
    """How to install: trusted keys (from --public-key or the host's install.toml), the venv's Python, units."""

    public_keys: tuple[Path, ...] = ()
    require_signature: bool = False
    allow_downgrade: bool = False
    python: str | None = None
    systemd_dir: Path | None = None
    # The agent's inbox: install without moving `current` (its switch moves it once the new version serves),
    # and only bundles of the release it serves.
    make_current: bool = True
    expect_name: str | None = None


def install(
    bundle_path: Path,
    prefix: Path,
    options: InstallOptions = InstallOptions(),
    *,
    on_phase: PhaseReporter = no_progress,
) -> InstallResult:
    """Verify a bundle completely, then make it the current release of its name under `prefix`; `on_phase`
    hears each phase as it starts."""
    started = time.perf_counter()
    prefix = Path(prefix)
    policy = load_install_policy()  # the host's rule applies whoever calls: CLI, API or install.py
    options = replace(
        options,
        public_keys=options.public_keys or policy.public_keys,
        require_signature=options.require_signature or policy.require_signature,
    )
    with open_bundle(Path(bundle_path)) as bundle, _writable(prefix):  # an unreadable bundle creates nothing
        prefix.mkdir(parents=True, exist_ok=True)
        with _locked(prefix):
            _recover(prefix)
            result = _install_locked(bundle, prefix, options, started=started, on_phase=on_phase)
        if options.systemd_dir is not None:
            runtime_env.write_systemd_units(options.systemd_dir, prefix, bundle.manifest)
        return result


def _install_locked(
    bundle: Bundle, prefix: Path, options: InstallOptions, *, started: float, on_phase: PhaseReporter
) -> InstallResult:
    signature = check_trusted(
        bundle.manifest_bytes, bundle.signature_bytes, list(options.public_keys), required=options.require_signature
    )
    manifest = bundle.manifest
    if options.expect_name is not None and manifest.name != options.expect_name:
        raise InstallError(f"the bundle holds release {manifest.name!r}; this host takes {options.expect_name!r}")
    python = options.python or runtime_env.default_python()
    name_dir = layout.name_dir(prefix, manifest.name)
    release = name_dir / manifest.version
    previous = layout.current_version(name_dir)
    installed = layout.is_installed(name_dir, manifest.version)
    if installed and (release / MANIFEST).read_bytes() != bundle.manifest_bytes:
        raise InstallError(
            f"{manifest.name} {manifest.version} is already installed with different contents",
            hint="give the new bundle a higher version (lmpack pack --version)",
        )
    _check_downgrade(manifest, previous, options.allow_downgrade)

    def result(action: str) -> InstallResult:
        return InstallResult(
            name=manifest.name,
            version=manifest.version,
            path=release,
            action=action,
            previous=previous,
            signature=signature,
            files=manifest.total_files,
            bytes=manifest.total_bytes,
            seconds=round(time.perf_counter() - started, 3),
        )

    if not installed:
        _check_free_space(prefix, manifest)
        runtime_env.check_python(manifest, python)
    raise_problems(bundle.check_structure(), bundle)
    size = f"{manifest.total_files} files, {megabytes(manifest.total_bytes)}"
    if installed:  # its files are already here, but a damaged bundle is still reported as damaged
        on_phase(f"{manifest.name} {manifest.version} is installed already: checking the bundle ({size})")
        raise_problems(check_contents(bundle), bundle)
        if previous == manifest.version or not options.make_current:
            return result("unchanged")
        on_phase(f"checking the installed files of {manifest.version} ({size})")
        with DirBundle(release) as kept:  # files on disk can rot or be edited: check before use
            check_bundle(kept, None)
        on_phase(f"pointing current at {manifest.version}")
        _switch(name_dir, manifest.version, previous)
        return result("switched")
    staging = prefix / layout.STAGING / f"{manifest.name}-{manifest.version}-{uuid.uuid4().hex[:8]}"
    with guard_disk_full(prefix / layout.STAGING):
        staging.mkdir(parents=True)
        on_phase(f"checking and extracting {size}")
        raise_problems(check_contents(bundle, extract_to=staging, stop_at_first=True), bundle)
        _write_durable(staging / MANIFEST, bundle.manifest_bytes)
        if bundle.signature_bytes is not None:
            _write_durable(staging / SIGNATURE, bundle.signature_bytes)
        _fsync_tree(staging)
        (name_dir / layout.MARKERS).mkdir(parents=True, exist_ok=True)
        os.rename(staging, release)  # named, but not installed until `current` or a marker says so
        fsync_dir(name_dir)
    remove_path(prefix / layout.STAGING)
    if manifest.wheelhouse is not None:  # at its final path (venvs are not relocatable), before the commit
        with guard_disk_full(release):  # any failure removes the uncommitted release: the old state stays
            on_phase(f"making the release's venv from {manifest.wheelhouse.wheels} bundled wheels (pip, offline)")
            try:
                runtime_env.create_venv(release, manifest, python, children=prefix / layout.CHILDREN)
            finally:
                (prefix / layout.CHILDREN).unlink(missing_ok=True)
            os.sync()  # pip does not fsync what it writes
    if not options.make_current:
        _touch(layout.marker(name_dir, manifest.version))  # installed and listed; `current` stays where it is
        return result("installed")
    on_phase(f"pointing current at {manifest.version}" + (f" (was {previous})" if previous else ""))
    _switch(name_dir, manifest.version, previous)
    return result("installed")


def is_installed(prefix: Path, name: str, version: str) -> bool:
    """Whether NAME VERSION is a committed release under `prefix` (not the leftover of an interrupted install)."""
    check_name(name, what="NAME")
    parse_version(version, what="VERSION")
    return layout.is_installed(layout.name_dir(prefix, name), version)


def set_current(prefix: Path, name: str, version: str) -> str | None:
    """Point `current` at an installed VERSION (the agent's version switch); returns the previous current.

    The same commit as an install (`_switch`, under the prefix lock), but no re-hashing of the release's
    files: the agent's switch gates on the new server's readiness (its warm-up generation) instead, and
    `lmpack verify PREFIX/releases/NAME/VERSION` rechecks the files when wanted.
    """
    check_name(name, what="NAME")
    parse_version(version, what="VERSION")
    prefix = Path(prefix)
    with _writable(prefix), _locked(prefix):
        name_dir = layout.name_dir(prefix, name)
        if not layout.is_installed(name_dir, version):
            raise NotFoundError(f"{name} {version} is not installed in {prefix}", hint=f"lmpack list --prefix {prefix}")
        previous = layout.current_version(name_dir)
        if previous != version:
            _switch(name_dir, version, previous)
        return previous


def _check_downgrade(manifest: Manifest, current: str | None, allow: bool) -> None:
    if current is None or allow:
        return
    if parse_version(manifest.version) < parse_version(current):
        raise InstallError(
            f"{manifest.name} {manifest.version} is older than the current {current}; refusing to downgrade",
            hint="pass --allow-downgrade if going back is intended",
        )


def list_releases(prefix: Path) -> list[Release]:
    """Installed releases under `prefix`, by name then version; reads only, takes no lock."""
    prefix = Path(prefix)
    if not prefix.is_dir():
        raise NotFoundError(f"install prefix {prefix} does not exist")
    releases: list[Release] = []
    root = prefix / layout.RELEASES
    for name_dir in sorted(root.iterdir()) if root.is_dir() else []:
        if name_dir.is_symlink() or not name_dir.is_dir():
            continue
        current = layout.current_version(name_dir)
        versions = [
            e.name for e in name_dir.iterdir() if VERSION_RE.match(e.name) and layout.is_installed(name_dir, e.name)
        ]
        for version in sorted(versions, key=parse_version):
            releases.append(_describe(name_dir / version, name_dir.name, version, current == version))
    return releases


def _describe(path: Path, name: str, version: str, current: bool) -> Release:
    try:
        manifest = parse_manifest((path / MANIFEST).read_bytes())
    except (OSError, BundleError) as exc:
        return Release(
            name=name,
            version=version,
            path=path,
            current=current,
            problem=f"{MANIFEST} unreadable: {getattr(exc, 'message', exc)}",
        )
    return Release(
        name=name,
        version=version,
        path=path,
        current=current,
        signed=(path / SIGNATURE).is_file(),
        variants=[v.name for v in manifest.variants],
        files=manifest.total_files,
        bytes=manifest.total_bytes,
    )


def uninstall(prefix: Path, name: str, version: str, *, force: bool = False) -> Release:
    """Remove one installed release; the current one only with `force` (then nothing is current)."""
    check_name(name, what="NAME")
    parse_version(version, what="VERSION")
    prefix = Path(prefix)
    if not prefix.is_dir():
        raise NotFoundError(f"install prefix {prefix} does not exist")
    with _writable(prefix), _locked(prefix):
        _recover(prefix)
        name_dir = layout.name_dir(prefix, name)
        if not layout.is_installed(name_dir, version):
            raise NotFoundError(f"{name} {version} is not installed in {prefix}", hint=f"lmpack list --prefix {prefix}")
        current = layout.current_version(name_dir) == version
        if current and not force:
            raise InstallError(
                f"{name} {version} is the current release; refusing to remove it",
                hint="install another version first, or pass --force to leave nothing current",
            )
        removed = _describe(name_dir / version, name, version, current)
        if layout.marker(name_dir, version).exists():
            remove_path(layout.marker(name_dir, version))  # still listed while it is current
            fsync_dir(name_dir / layout.MARKERS)
        if current:
            os.unlink(name_dir / layout.CURRENT)  # the commit point of a forced removal
            fsync_dir(name_dir)
        remove_path(name_dir / version)  # no longer installed: a kill here leaves a leftover for _recover
        if not any(VERSION_RE.match(e.name) for e in name_dir.iterdir()):
            remove_path(name_dir)
        return removed
