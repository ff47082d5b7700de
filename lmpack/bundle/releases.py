"""The install prefix: where installed releases live (docs/airgapped-install.md).

    PREFIX/releases/NAME/VERSION/            a complete, verified release: the bundle's files (manifest.json,
                                             manifest.sig, variants/VARIANT/...) and the venv made from its wheels
    PREFIX/releases/NAME/current             symlink to VERSION, replaced with os.replace of a temp link
    PREFIX/releases/NAME/.installed/VERSION  marker: a committed release that is kept until uninstalled
    PREFIX/.staging/                         extraction in progress, removed when done
    PREFIX/.install-children                 process groups making a venv; a killed install's are ended by the next

A release is installed when it is `current` or has a marker; any other version directory is the leftover
of an interrupted install. This module is the one place those names are spelled: install writes the layout
(install.py), the server and the agent find releases through it (runtime/select.py, agent/supervisor.py).

Runtime-side: standard library, lmpack.errors and lmpack.bundle.manifest only.
"""

from __future__ import annotations

import os
from pathlib import Path

from lmpack.bundle.manifest import MANIFEST, VARIANTS_DIR, VERSION_RE
from lmpack.errors import NotFoundError

RELEASES = "releases"
CURRENT = "current"
MARKERS = ".installed"
STAGING = ".staging"
TEMP_LINK = ".current-"  # prefix of the link that replaces `current`
CHILDREN = ".install-children"  # process groups an install's venv steps run in (runtime_env.reap_children)


def name_dir(prefix: Path, name: str) -> Path:
    """PREFIX/releases/NAME: every version of one release name."""
    return Path(prefix) / RELEASES / name


def release_dir(prefix: Path, name: str, version: str) -> Path:
    return name_dir(prefix, name) / version


def marker(name_root: Path, version: str) -> Path:
    return name_root / MARKERS / version


def current_version(name_root: Path) -> str | None:
    """The version `current` points to in NAME's directory, or None; a pointer that is not a plain version is
    ignored."""
    try:
        target = os.readlink(name_root / CURRENT)
    except OSError:
        return None
    return target if VERSION_RE.match(target) and (name_root / target).is_dir() else None


def is_installed(name_root: Path, version: str) -> bool:
    """Committed: the version's directory exists and `current` or a marker names it."""
    return (name_root / version).is_dir() and (
        current_version(name_root) == version or marker(name_root, version).is_file()
    )


def is_release_dir(root: Path) -> bool:
    """A VERSION directory (or `current`) under PREFIX/releases/NAME, as opposed to an unpacked bundle."""
    return Path(root).resolve().parent.parent.name == RELEASES


def through_current(root: Path) -> Path:
    """PREFIX/releases/NAME is read through its `current` link; any other directory is itself."""
    root = Path(root)
    return root / CURRENT if (root / CURRENT).is_dir() and not (root / MANIFEST).is_file() else root


def release_variants(release: Path) -> list[Path]:
    """The variant directories of an installed release (or unpacked bundle), by name."""
    variants = Path(release) / VARIANTS_DIR
    return sorted(p for p in variants.iterdir() if p.is_dir()) if variants.is_dir() else []


def serving_release(prefix: Path, name: str, version: str | None) -> Path:
    """The release directory to serve: VERSION when pinned (an agent's switch), else what `current` points to."""
    if version is not None:
        pinned = release_dir(prefix, name, version)
        if not pinned.is_dir():
            raise NotFoundError(
                f"{name} {version} is not installed under {prefix}", hint=f"lmpack list --prefix {prefix}"
            )
        return pinned.resolve()
    current = name_dir(prefix, name) / CURRENT
    if not current.is_dir():
        raise NotFoundError(
            f"{current}: release {name!r} has no current version under {prefix}", hint=f"lmpack list --prefix {prefix}"
        )
    return current.resolve()
