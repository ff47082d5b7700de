"""The host's install policy (install.toml): whether bundles must be signed, and by which keys.

A host that requires signatures says so once, in configuration an administrator controls, instead of
relying on every operator to pass --public-key. Read from $LMPACK_HOME/install.toml when LMPACK_HOME
is set (tests, per-user setups), else /etc/lmpack/install.toml; a missing file means no policy.

    schema_version = 1
    require_signature = true
    public_keys = ["/etc/lmpack/release.pub"]   # relative paths are taken from the file's directory

Runtime-side: standard library and lmpack's TOML reader only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lmpack.config.toml_reader import TableReader, check_schema_version, load_toml

SYSTEM_POLICY = Path("/etc/lmpack/install.toml")


@dataclass(frozen=True)
class InstallPolicy:
    require_signature: bool = False
    public_keys: tuple[Path, ...] = ()
    source: Path | None = None


def policy_path() -> Path:
    home = os.environ.get("LMPACK_HOME")
    return Path(home) / "install.toml" if home else SYSTEM_POLICY


def load_install_policy(path: Path | None = None) -> InstallPolicy:
    path = policy_path() if path is None else path
    if not path.is_file():
        return InstallPolicy()
    reader = TableReader(load_toml(path), source=str(path))
    check_schema_version(reader)
    require = bool(reader.bool("require_signature", False))
    keys = tuple(path.parent / key for key in reader.str_list("public_keys", []))
    reader.finish()
    return InstallPolicy(require_signature=require, public_keys=keys, source=path)
