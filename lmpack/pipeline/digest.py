"""Content digests of files and directories, the identity of every artifact in the step cache."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lmpack.fsio import file_sha256


def tree_files(root: Path) -> list[Path]:
    """Regular files under root, sorted by relative path; links are never followed."""
    return sorted(
        (p for p in root.rglob("*") if p.is_file() and not p.is_symlink()), key=lambda p: p.relative_to(root).as_posix()
    )


def tree_sha256(root: Path) -> str:
    """Digest of a directory: relative paths, sizes and file digests, in sorted order."""
    entries = [(p.relative_to(root).as_posix(), p.stat().st_size, file_sha256(p)) for p in tree_files(root)]
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def tree_size(root: Path) -> int:
    return sum(p.stat().st_size for p in tree_files(root))


def json_sha256(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
