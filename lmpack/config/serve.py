"""`lmpack serve` settings: one TOML file, then LMPACK_SERVE_* variables, then command-line flags, each overriding.

A server is usually started by a service unit, so its settings belong in a file an operator can review
and version; flags and variables stay for one-off changes. The file is read with the strict reader
(an unknown or mistyped field is an error naming the file and the field, never silently ignored), and
relative paths in it are relative to the file, so a unit's working directory does not matter.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from lmpack.config import paths
from lmpack.config.toml_reader import TableReader, check_schema_version, load_toml
from lmpack.errors import ConfigError, NotFoundError

MIB = 1024 * 1024


@dataclass(frozen=True)
class ServeSettings:
    variant: str | None = None  # serve this variant of a bundle or release (by name), not the one lmpack would choose
    host: str = "127.0.0.1"
    port: int = 8000
    threads: int | None = None
    max_concurrency: int = 1
    max_batch: int = 8          # sequences per batched decode step (runtime/batcher.py); 1 turns batching off
    batch_align: int = 4        # left-padded rows batch when their lengths agree modulo this; 4 keeps answers exact
    queue: int = 8
    drain_seconds: int = 30
    api_key_file: Path | None = None
    max_body_bytes: int = 2 * MIB
    tls_cert: Path | None = None
    tls_key: Path | None = None
    cache: bool = False
    cache_max_entries: int = 1024
    cache_max_bytes: int = 64 * MIB
    strict: bool = False            # refuse rather than serve a mismatched TensorRT engine's variant on CUDA or the CPU
    engine_rebuild: bool = True     # rebuild a mismatched TensorRT engine on this host, once (docs/gpu-targets.md)
    engine_cache_dir: Path | None = None  # where rebuilt engines are kept; default: beside the release


# field: (minimum, maximum) for the integers, shared by the file and the environment.
_BOUNDS = {"port": (0, 65535), "threads": (1, 1024), "max_concurrency": (1, 1024), "max_batch": (1, 256),
           "batch_align": (1, 64), "queue": (0, 100_000), "drain_seconds": (0, 86_400),
           "max_body_bytes": (1024, 1024 * MIB),
           "cache_max_entries": (1, 10_000_000), "cache_max_bytes": (1024, 64 * 1024 * MIB)}
_PATHS = ("api_key_file", "tls_cert", "tls_key", "engine_cache_dir")
# Settings that LMPACK_SERVE_<NAME> may set: the scalar ones a unit file or container might inject.
ENV_FIELDS = ("variant", "host", "port", "threads", "max_concurrency", "max_batch", "batch_align", "queue",
              "drain_seconds", "api_key_file", "tls_cert", "tls_key")


def read_serve_file(path: Path) -> dict[str, Any]:
    """The settings a serve.toml sets (only those), checked; paths resolved against the file's folder."""
    path = Path(path)
    top = TableReader(load_toml(path), source=str(path))
    check_schema_version(top)
    values: dict[str, Any] = {"variant": top.str("variant"), "host": top.str("host")}
    for name, (low, high) in _BOUNDS.items():
        if not name.startswith("cache_"):
            values[name] = top.int(name, minimum=low, maximum=high)
    values["api_key_file"] = top.str("api_key_file")
    values["strict"] = top.bool("strict")
    values["engine_rebuild"] = top.bool("engine_rebuild")
    values["engine_cache_dir"] = top.str("engine_cache_dir")
    if (tls := top.table("tls")) is not None:
        values["tls_cert"], values["tls_key"] = tls.str("cert", required=True), tls.str("key", required=True)
        tls.finish()
    if (cache := top.table("cache")) is not None:
        values["cache"] = cache.bool("enabled")
        for name in ("max_entries", "max_bytes"):
            low, high = _BOUNDS[f"cache_{name}"]
            values[f"cache_{name}"] = cache.int(name, minimum=low, maximum=high)
        cache.finish()
    top.finish()
    for name in _PATHS:
        if values.get(name) is not None:
            values[name] = path.parent / values[name]
    return {k: v for k, v in values.items() if v is not None}


def read_serve_env() -> dict[str, Any]:
    """LMPACK_SERVE_<NAME> values, converted and checked; an error names the variable."""
    values: dict[str, Any] = {}
    for name, raw in paths.serve_env(ENV_FIELDS).items():
        variable = f"LMPACK_SERVE_{name.upper()}"
        if name in _BOUNDS:
            low, high = _BOUNDS[name]
            try:
                number = int(raw)
            except ValueError:
                raise ConfigError(f"{variable}={raw!r} is not an integer") from None
            if not low <= number <= high:
                raise ConfigError(f"{variable}={number} is outside [{low}, {high}]")
            values[name] = number
        else:
            values[name] = Path(raw) if name in _PATHS else raw
    return values


def resolve_serve_settings(config_file: Path | None, flags: dict[str, Any]) -> ServeSettings:
    """Defaults, then the file, then the environment, then the flags that were given (None: not given)."""
    settings = ServeSettings()
    layers = [read_serve_file(config_file) if config_file is not None else {}, read_serve_env(),
              {k: v for k, v in flags.items() if v is not None}]
    known = {f.name for f in fields(ServeSettings)}
    for layer in layers:
        unknown = set(layer) - known
        if unknown:  # a programming error in a caller, not a user's
            raise TypeError(f"unknown serve settings {sorted(unknown)}")
        settings = replace(settings, **layer)
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise ConfigError("TLS needs both a certificate and a key (--tls-cert and --tls-key, or [tls] cert and key)")
    for name in ("tls_cert", "tls_key"):
        value = getattr(settings, name)
        if value is not None and not Path(value).is_file():
            raise NotFoundError(f"{name.replace('_', ' ')} file {value} does not exist or is not a file")
    return settings
