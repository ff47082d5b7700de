"""`lmpack pack` and `lmpack sign`: variant directories in, one deterministic bundle out.

Pack copies the variants into a staging bundle directory, digesting each file as it is copied (so the
manifest describes the copy, even if a source file changes meanwhile), writes manifest.json, then
streams that directory into a tarball whose bytes depend only on the input: two packs of the same
variants are identical, which lets anyone check a bundle by rebuilding it.

Build-side, but it needs nothing beyond lmpack.bundle: it reads variant directories through variant_dir.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lmpack import __version__
from lmpack.bundle import wheels as wheelhouse
from lmpack.bundle.archive import HashingReader, create_in, write_tarball
from lmpack.bundle.manifest import (
    MANIFEST,
    SIGNATURE,
    VARIANTS_DIR,
    FileEntry,
    Manifest,
    Wheelhouse,
    check_name,
    check_relative_path,
    parse_version,
)
from lmpack.bundle.sbom import SBOM_NAME, make_sbom
from lmpack.bundle.signing import sign_manifest
from lmpack.bundle.variant_dir import (
    REPORT_JSON,
    VARIANT_FILE,
    VariantFiles,
    entry_of,
    read_variant_files,
    required_field,
)
from lmpack.bundle.verify import DirBundle, check_bundle, open_bundle, raise_problems
from lmpack.errors import BundleError
from lmpack.fsio import file_sha256, guard_disk_full, publish, remove_path
from lmpack.progress import PhaseReporter, megabytes, no_progress

INSTALL_SCRIPT = "install.py"  # stdlib-only first installer at the bundle's top level (lmpack/bundle/bootstrap.py)
_CHUNK = 1 << 20


@dataclass(frozen=True)
class PackResult:
    path: Path
    directory: Path | None
    name: str
    version: str
    files: int
    bytes: int
    archive_bytes: int
    archive_sha256: str
    variants: list[str]
    seconds: float
    wheelhouse: dict[str, Any] | None = None


@dataclass(frozen=True)
class WheelOptions:
    """Ship the runtime wheelhouse; `source` is a local wheel directory to resolve from offline (tests, mirrors)."""

    source: Path | None = None
    extras: tuple[str, ...] = ()  # lmpack extras on top of the runtime (wheels.OPTIONAL_EXTRAS): "fleet"


def pack(
    variant_dirs: list[Path],
    output: Path,
    *,
    name: str,
    version: str,
    keep_dir: Path | None = None,
    wheels: WheelOptions | None = None,
    on_phase: PhaseReporter = no_progress,
) -> PackResult:
    """Write the bundle tarball `output` (and the unpacked bundle directory `keep_dir`, if given).

    With `wheels`, the bundle also carries the runtime wheelhouse, its lock, install.py and an SBOM, so a
    host with nothing but Python 3 can install it. `on_phase` hears each phase as it starts.
    """
    started = time.perf_counter()
    check_name(name, what="--name")
    parse_version(version, what="--version")
    variants = sorted((read_variant_files(Path(d)) for d in variant_dirs), key=lambda v: v.name)
    if not variants:
        raise BundleError("pack needs at least one variant directory")
    if len({v.name.casefold() for v in variants}) != len(variants):
        raise BundleError("two variant directories have the same name; rename one (lmpack build --name)")
    output = Path(output)
    manifest_holder: list[Manifest] = []

    def build_dir(staging: Path) -> None:
        manifest_holder.append(_stage(staging, variants, name=name, version=version, wheels=wheels, on_phase=on_phase))

    directory = (
        Path(keep_dir) if keep_dir is not None else output.parent / f".{output.name}.bundle-{uuid.uuid4().hex[:8]}"
    )
    try:
        if keep_dir is not None:
            publish(directory, build_dir)
        else:
            output.parent.mkdir(parents=True, exist_ok=True)
            with guard_disk_full(directory):
                build_dir(directory)
        on_phase(f"writing {output} ({megabytes(manifest_holder[0].total_bytes)} to compress)")
        with DirBundle(directory) as bundle:
            publish(output, lambda staging: write_tarball(staging, bundle.manifest_bytes, None, bundle.contents()))
    finally:
        if keep_dir is None:
            remove_path(directory)
    manifest = manifest_holder[0]
    return PackResult(
        path=output,
        directory=Path(keep_dir) if keep_dir is not None else None,
        name=name,
        version=version,
        files=manifest.total_files,
        bytes=manifest.total_bytes,
        archive_bytes=output.stat().st_size,
        archive_sha256=file_sha256(output),
        variants=[v.name for v in variants],
        seconds=round(time.perf_counter() - started, 3),
        wheelhouse=manifest.wheelhouse.to_dict() if manifest.wheelhouse else None,
    )


def _stage(
    staging: Path,
    variants: list[VariantFiles],
    *,
    name: str,
    version: str,
    wheels: WheelOptions | None,
    on_phase: PhaseReporter,
) -> Manifest:
    staging.mkdir(parents=True)
    entries: list[FileEntry] = []
    size = sum(path.stat().st_size for variant in variants for path in variant.files)
    on_phase(f"copying and hashing {len(variants)} variant(s): {megabytes(size)}")
    for variant in variants:
        for source in variant.files:
            relative = f"{VARIANTS_DIR}/{variant.name}/{source.relative_to(variant.root).as_posix()}"
            entries.append(_copy_digesting(source, staging, check_relative_path(relative, what=str(source))))
    built_at = _built_at(variants)
    house = None
    if wheels is not None:
        on_phase(
            "resolving and fetching the runtime wheels (pip)"
            if wheels.source is None
            else f"taking the runtime wheels from {wheels.source} (pip, offline)"
        )
        house = _stage_wheels(staging, variants, entries, wheels, name=name, version=version, built_at=built_at)
    entries.sort(key=lambda e: e.path)
    manifest = Manifest(
        name=name,
        version=version,
        built_at=built_at,
        lmpack_version=__version__,
        variants=tuple(entry_of(v) for v in variants),
        files=tuple(entries),
        wheelhouse=house,
    )
    (staging / MANIFEST).write_bytes(manifest.to_bytes())
    return manifest


def _target_facts(variants: list[VariantFiles]) -> tuple[str, str]:
    """The one (platform tag, Python) that every variant's target agrees on: a wheelhouse serves one host kind."""
    facts = {
        (
            str(required_field(v.meta["target"], "platform_tag", v.root / VARIANT_FILE)),
            str(required_field(v.meta["target"], "python", v.root / VARIANT_FILE)),
        )
        for v in variants
    }
    if len(facts) != 1:
        raise BundleError(
            f"the variants target different platforms or Pythons {sorted(facts)}; one bundle ships one wheelhouse",
            hint="pack variants for each platform into their own bundle",
        )
    return facts.pop()


def _stage_wheels(
    staging: Path,
    variants: list[VariantFiles],
    entries: list[FileEntry],
    options: WheelOptions,
    *,
    name: str,
    version: str,
    built_at: str,
) -> Wheelhouse:
    """Add wheels/, the lock, install.py and the SBOM to the staging bundle (entries grows in place)."""
    platform_tag, python = _target_facts(variants)
    model_entries = list(entries)
    with tempfile.TemporaryDirectory(prefix="lmpack-wheels-", dir=staging.parent) as scratch:
        runtime = wheelhouse.runtime_set([v.meta["target"] for v in variants], options.extras)
        wheels = wheelhouse.build_wheelhouse(
            Path(scratch), platform_tag=platform_tag, python=python, source=options.source, runtime=runtime
        )
        for wheel in wheels:
            entries.append(
                _copy_digesting(Path(scratch) / wheel.filename, staging, f"{wheelhouse.WHEELS_DIR}/{wheel.filename}")
            )
    entries.append(_write_digesting(staging, wheelhouse.LOCK_PATH, wheelhouse.lock_text(wheels).encode("ascii")))
    script = (Path(__file__).parent / "bootstrap.py").read_bytes()
    entries.append(_write_digesting(staging, INSTALL_SCRIPT, script, mode=0o755))
    sbom = make_sbom(name=name, version=version, built_at=built_at, wheels=wheels, model_files=model_entries)
    entries.append(_write_digesting(staging, SBOM_NAME, sbom))
    return Wheelhouse(
        platform_tag=platform_tag,
        python=python,
        lock=wheelhouse.LOCK_PATH,
        wheels=len(wheels),
        bytes=sum(w.size for w in wheels),
    )


def _write_digesting(staging: Path, relative: str, data: bytes, *, mode: int = 0o644) -> FileEntry:
    entry = FileEntry(path=relative, size=len(data), mode=mode, sha256=hashlib.sha256(data).hexdigest())
    with open(create_in(staging, entry), "wb") as out:
        out.write(data)
        os.fchmod(out.fileno(), mode)
    return entry


def _copy_digesting(source: Path, staging: Path, relative: str) -> FileEntry:
    """Copy one file into the staging bundle and describe the copy: size, normalised mode, sha256."""
    stat = source.stat()
    mode = 0o755 if stat.st_mode & 0o111 else 0o644
    fd = create_in(staging, FileEntry(path=relative, size=stat.st_size, mode=mode, sha256="0" * 64))
    with open(source, "rb") as src, open(fd, "wb") as out:
        reader = HashingReader(src)
        shutil.copyfileobj(reader, out, _CHUNK)
        os.fchmod(out.fileno(), mode)
    return FileEntry(path=relative, size=reader.count, mode=mode, sha256=reader.sha256.hexdigest())


def _built_at(variants: list[VariantFiles]) -> str:
    """SOURCE_DATE_EPOCH if set, else the newest build among the variants: never the clock, so packs repeat."""
    if epoch := os.environ.get("SOURCE_DATE_EPOCH"):
        try:
            return datetime.fromtimestamp(int(epoch), timezone.utc).isoformat(timespec="seconds")
        except ValueError as exc:
            raise BundleError(f"SOURCE_DATE_EPOCH={epoch!r} is not a number of seconds") from exc
    times = [datetime.fromisoformat(str(required_field(v.report, "built_at", v.root / REPORT_JSON))) for v in variants]
    return max(times).astimezone(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class SignResult:
    path: Path
    name: str
    version: str
    key_id: str
    archive_sha256: str | None  # a tarball's new digest (signing rewrites it); None for a bundle directory


def sign_bundle(path: Path, private_key: Path, *, on_phase: PhaseReporter = no_progress) -> SignResult:
    """Sign a bundle in place, after checking every file: a signature must never vouch for damaged contents.

    A tarball is rewritten with manifest.sig as its second member, so its sha256 changes: the result has the
    new one (the one `lmpack pack` printed no longer applies)."""
    path = Path(path)
    with open_bundle(path) as bundle:
        signature = sign_manifest(bundle.manifest_bytes, private_key)
        size = megabytes(bundle.manifest.total_bytes)
        if isinstance(bundle, DirBundle):
            on_phase(f"checking {bundle.manifest.total_files} files ({size}) against the manifest")
            check_bundle(bundle, None)
            publish(path / SIGNATURE, lambda staging: staging.write_bytes(signature))
        else:  # rewrite the tarball with manifest.sig as member 1; contents are re-digested on the way
            raise_problems(bundle.check_structure(), bundle)
            on_phase(f"checking and rewriting {path} with its signature ({size})")
            publish(path, lambda staging: write_tarball(staging, bundle.manifest_bytes, signature, bundle.contents()))
        manifest = bundle.manifest
    return SignResult(
        path=path,
        name=manifest.name,
        version=manifest.version,
        key_id=json.loads(signature)["key_id"],
        archive_sha256=None if path.is_dir() else file_sha256(path),
    )
