"""API keys: loaded once at start from a file and/or the LMPACK_API_KEYS value, checked in constant time."""

from __future__ import annotations

import hmac
from pathlib import Path

from lmpack.errors import ConfigError, NotFoundError


def load_api_keys(key_file: Path | None = None, env_value: str | None = None) -> frozenset[str]:
    """Keys from `key_file` (one a line, `#` comments) and `env_value` (comma-separated); empty: no auth.

    A key file that exists but holds no key is an error: an operator who passed one meant to require a key.
    """
    keys: set[str] = set()
    if key_file is not None:
        path = Path(key_file)
        if not path.is_file():
            raise NotFoundError(f"API key file {path} does not exist")
        lines = [line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines()]
        found = {line for line in lines if line}
        if not found:
            raise ConfigError(f"API key file {path} holds no key", hint="write one key a line")
        keys |= found
    if env_value:
        keys |= {k.strip() for k in env_value.split(",") if k.strip()}
    for key in keys:
        if len(key) < 8 or any(c.isspace() for c in key):
            raise ConfigError("every API key must be at least 8 characters without spaces")
    return frozenset(keys)


def bearer_ok(authorization: str | None, keys: frozenset[str]) -> bool:
    """True when no keys are configured, or the Authorization header carries one of them as a Bearer token."""
    if not keys:
        return True
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return False
    offered = token.strip().encode()
    # compare with every key (no early exit), so timing does not tell which prefix matched
    return sum(hmac.compare_digest(offered, key.encode()) for key in keys) > 0
