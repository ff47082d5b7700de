"""File-system helpers shared by the build and the runtime halves: atomic publication, disk-full mapping.

This module imports nothing but the standard library and lmpack.errors, so the air-gapped runtime
(verify, install) can use it without pulling in the build pipeline.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from lmpack.errors import DiskFullError

__all__ = ["publish", "publish_new", "guard_disk_full", "is_disk_full", "remove_path", "fsync_dir"]


def remove_path(path: Path) -> None:
    """Remove a file, a symlink or a directory tree; absent is fine. Never follows a symlink."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable across a power cut, not only across a kill."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(destination: Path, write: Callable[[Path], object]) -> None:
    """Write into a hidden sibling, then rename over `destination`: never a half-written result.

    `write` receives the staging path and creates a file or a directory there. A file replaces an
    existing destination atomically (os.replace); a directory is swapped in with two renames.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.parent / f".{destination.name}.partial-{uuid.uuid4().hex[:8]}"
    with guard_disk_full(staging):
        write(staging)
        if staging.is_file() or not destination.exists():
            os.replace(staging, destination)
        else:
            retired = destination.parent / f".{destination.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(destination, retired)
            os.rename(staging, destination)
            remove_path(retired)


def publish_new(destination: Path, write: Callable[[Path], object]) -> bool:
    """Like `publish`, but never replaces: when `destination` appeared meanwhile (another process wrote the
    same thing), keep that one, drop ours and return False. True when ours was published."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.parent / f".{destination.name}.partial-{uuid.uuid4().hex[:8]}"
    with guard_disk_full(staging):
        write(staging)
        if destination.exists():
            remove_path(staging)
            return False
        try:
            os.rename(staging, destination)  # a directory: fails when one exists by now
        except OSError as exc:
            if not destination.exists() or is_disk_full(exc):
                raise
            remove_path(staging)
            return False
        fsync_dir(destination.parent)
        return True


class guard_disk_full:
    """Turn ENOSPC/EDQUOT inside the block into DiskFullError; on any failure remove `cleanup` first."""

    def __init__(self, cleanup: Path | None = None):
        self.cleanup = cleanup

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and self.cleanup is not None:
            remove_path(self.cleanup)
        if is_disk_full(exc):
            raise DiskFullError(
                f"disk full while writing {getattr(exc, 'filename', None) or self.cleanup}; nothing partial was kept",
                hint="free some space (or point LMPACK_CACHE / -o at a larger disk) and run again",
            ) from exc
        return False


def is_disk_full(exc: BaseException | None) -> bool:
    if isinstance(exc, shutil.Error):  # copytree gathers per-file errors as (src, dst, message) text
        return any(f"[Errno {errno.ENOSPC}]" in str(e) or f"[Errno {errno.EDQUOT}]" in str(e) for e in exc.args[0])
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB chunks (the digest every cache entry, manifest and bundle uses)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
