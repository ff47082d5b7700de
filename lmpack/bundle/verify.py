"""Verify a bundle offline, as a tarball or an unpacked directory: every file hashed, nothing assumed.

Both forms are read through the same two-step interface, `check_structure` (names, types, missing,
extra and mis-sized files; no content read) then `contents` (each listed file's data once), so
`verify`, `install` and `sign` share one definition of a good bundle.

Runtime-side: standard library, lmpack.errors and lmpack.bundle only.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from lmpack.bundle.archive import MAX_SIGNATURE_BYTES, TarBundle, create_in, drain
from lmpack.bundle.manifest import (
    MANIFEST,
    MAX_MANIFEST_BYTES,
    RESERVED,
    RESERVED_DIRS,
    SIGNATURE,
    FileEntry,
    parse_manifest,
)
from lmpack.bundle.signing import check_signature
from lmpack.errors import BundleError, NotFoundError, VerificationError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


class DirBundle:
    """An unpacked bundle (or an installed release). Files are opened component by component without
    following links, so a link planted after the structure check is refused rather than read through."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._root = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # the root may be `current`
        try:
            manifest_bytes = self._read_small(MANIFEST, MAX_MANIFEST_BYTES)
            if manifest_bytes is None:
                raise BundleError(f"{self.path} has no {MANIFEST}; is it a bundle directory?")
            self.manifest_bytes: bytes = manifest_bytes
            self.signature_bytes: bytes | None = self._read_small(SIGNATURE, MAX_SIGNATURE_BYTES)
            self.manifest = parse_manifest(self.manifest_bytes)
        except BaseException:
            os.close(self._root)
            raise

    def close(self) -> None:
        os.close(self._root)

    def __enter__(self) -> DirBundle:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _open(self, relative: str) -> int:
        parts = relative.split("/")
        fd = self._root
        try:
            for part in parts[:-1]:
                next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                if fd != self._root:
                    os.close(fd)
                fd = next_fd
            return os.open(parts[-1], _FILE_FLAGS, dir_fd=fd)
        finally:
            if fd != self._root:
                os.close(fd)

    def _read_small(self, name: str, limit: int) -> bytes | None:
        try:
            fd = self._open(name)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise BundleError(f"{self.path / name} cannot be read: {exc.strerror}") from exc
        with open(fd, "rb") as handle:
            data = handle.read(limit + 1)
        if len(data) > limit:
            raise BundleError(f"{self.path / name} is larger than {limit} bytes")
        return data

    def check_structure(self) -> list[str]:
        """Every entry on disk against the manifest: links, devices, extra and missing files, wrong sizes."""
        expected = self.manifest.by_path
        directories = {"/".join(p.split("/")[:i]) for p in expected for i in range(1, p.count("/") + 1)}
        problems: list[str] = []
        found: set[str] = set()
        stack = [""]
        while stack:
            prefix = stack.pop()
            with os.scandir(self.path / prefix if prefix else self.path) as entries:
                for item in entries:
                    relative = f"{prefix}/{item.name}" if prefix else item.name
                    if item.is_symlink():
                        problems.append(f"{relative}: a symlink; bundles hold regular files only")
                    elif item.is_dir(follow_symlinks=False):
                        if relative in RESERVED_DIRS:
                            continue  # an installed release's venv: made by install, never part of the bundle
                        if relative in directories:
                            stack.append(relative)
                        else:
                            problems.append(f"{relative}/: extra directory, nothing in it is listed in {MANIFEST}")
                    elif not item.is_file(follow_symlinks=False):
                        problems.append(f"{relative}: not a regular file")
                    elif item.stat(follow_symlinks=False).st_nlink > 1:  # a tar hard link member, extracted
                        problems.append(f"{relative}: a hard link; bundles hold regular files only")
                    elif relative in expected:
                        found.add(relative)
                        size, wanted = item.stat(follow_symlinks=False).st_size, expected[relative].size
                        if size != wanted:
                            problems.append(
                                f"{relative}: truncated ({size} of {wanted} bytes)"
                                if size < wanted
                                else f"{relative}: larger than the manifest says ({size} > {wanted} bytes)"
                            )
                    elif relative not in RESERVED:
                        problems.append(f"{relative}: extra file, not listed in {MANIFEST}")
        problems += [f"{path}: missing (listed in {MANIFEST})" for path in expected if path not in found]
        return sorted(problems)

    def contents(self) -> Iterator[tuple[FileEntry, BinaryIO]]:
        for entry in self.manifest.files:
            try:
                fd = self._open(entry.path)
            except OSError as exc:
                reason = "a link" if exc.errno == errno.ELOOP else exc.strerror
                raise VerificationError(f"{entry.path}: cannot be read ({reason})") from exc
            with open(fd, "rb") as stream:
                yield entry, stream


Bundle = DirBundle | TarBundle


def open_bundle(path: Path) -> Bundle:
    """A directory is an unpacked bundle; a file is a bundle tarball."""
    path = Path(path)
    if path.is_dir():
        return DirBundle(path)
    if path.is_file():
        return TarBundle(path)
    raise NotFoundError(f"bundle {path} does not exist")


def check_contents(bundle: Bundle, *, extract_to: Path | None = None, stop_at_first: bool = False) -> list[str]:
    """Hash every listed file (writing it under `extract_to` if given); the problems found, file first."""
    problems: list[str] = []
    for entry, stream in bundle.contents():
        fd = create_in(extract_to, entry) if extract_to is not None else None
        if problem := drain(stream, entry, fd):
            problems.append(problem)
            if stop_at_first:
                break
    return problems


def raise_problems(problems: list[str], bundle: Bundle) -> None:
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise VerificationError(
            f"{bundle.path} does not match its manifest: {problems[0]}{more}",
            problems=problems,
            hint="the bundle was damaged or altered after it was packed; copy it again from the build host",
        )


def check_bundle(bundle: Bundle, public_key: Path | None, *, extract_to: Path | None = None) -> str:
    """Signature, then structure (nothing read or written yet), then contents; returns the signature status."""
    signature = check_signature(bundle.manifest_bytes, bundle.signature_bytes, public_key)
    raise_problems(bundle.check_structure(), bundle)
    raise_problems(check_contents(bundle, extract_to=extract_to, stop_at_first=extract_to is not None), bundle)
    return signature


@dataclass(frozen=True)
class VerifyReport:
    path: Path
    form: str
    name: str
    version: str
    files: int
    bytes: int
    signature: str
    variants: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def verify_bundle(path: Path, *, public_key: Path | None = None) -> VerifyReport:
    """Check a bundle completely, offline; raise naming every file that is wrong."""
    started = time.perf_counter()
    with open_bundle(path) as bundle:
        signature = check_bundle(bundle, public_key)
        manifest = bundle.manifest
        return VerifyReport(
            path=Path(path),
            form="directory" if isinstance(bundle, DirBundle) else "tarball",
            name=manifest.name,
            version=manifest.version,
            files=manifest.total_files,
            bytes=manifest.total_bytes,
            signature=signature,
            variants=[v.to_dict() for v in manifest.variants],
            seconds=round(time.perf_counter() - started, 3),
        )
