"""The cluster token: one secret file that every node and client of a fleet holds, handed to Ray's token
authentication (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH), which refuses any process without it.

A token readable by other users of a host would let them join the cluster and run code on every node, so
a file with group or world permissions is refused, as ssh refuses such a key.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from lmpack.errors import ConfigError, NotFoundError

TOKEN_ENV = "LMPACK_FLEET_TOKEN_FILE"  # where fleet commands look when --token-file is not given
TOKEN_BYTES = 32  # 256 bits, as hex
MIN_TOKEN_CHARS = 32


def create_token(path: Path) -> Path:
    """Write a new random token to `path` with mode 0600; an existing file is never overwritten."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} exists; a fleet token is never overwritten", hint="remove it first") from None
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(TOKEN_BYTES) + "\n")
    return path


def check_token_file(path: Path | None) -> Path:
    """The token file to use (`path`, else $LMPACK_FLEET_TOKEN_FILE), checked: present, private, long enough."""
    if path is None:
        env = os.environ.get(TOKEN_ENV)
        if not env:
            raise ConfigError(
                "a fleet needs a token file: --token-file FILE or LMPACK_FLEET_TOKEN_FILE",
                hint="make one with `lmpack fleet token FILE` and copy it to every node",
            )
        path = Path(env)
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise NotFoundError(f"token file {path} does not exist", hint=f"lmpack fleet token {path}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"token file {path} is not a regular file")
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"token file {path} is readable by other users (mode {stat.S_IMODE(info.st_mode):04o})",
            hint=f"chmod 600 {path}",
        )
    token = path.read_text(encoding="utf-8", errors="replace").strip()
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise ConfigError(
            f"token file {path} must hold one token of at least {MIN_TOKEN_CHARS} characters",
            hint="make one with `lmpack fleet token FILE`",
        )
    return path


def ray_auth_env(token_file: Path) -> dict[str, str]:
    """The environment that makes a Ray process (node, driver or worker) use the token."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(Path(token_file).resolve())}
