"""`lmpack serve` settings, declared once: ServeSettings' fields and their docstrings.

Each field makes a command-line option (lmpack/cli/serve.py), a serve.toml key, an LMPACK_SERVE_<NAME>
variable and a row of docs/serving.md's table (`settings_table`, checked by a test), with one type, one
default and one set of bounds (the shape of vLLM's FrontendArgs). Precedence, last one winning: the default,
the file, the environment, the flags. A server is usually started by a service unit, so its settings belong
in a file an operator can review and version; the file is read strictly (an unknown or mistyped field is an
error naming the file and the field), and relative paths in it are relative to the file.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import typing
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from lmpack.config import paths
from lmpack.config.toml_reader import TableReader, check_schema_version, load_toml
from lmpack.errors import ConfigError, NotFoundError

MIB = 1024 * 1024
# Sequences decoded together; also the default bound of a TensorRT engine's profile (steps/tensorrt.py).
DEFAULT_MAX_BATCH = 8
_META = "lmpack"
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


@dataclass(frozen=True)
class SettingMeta:
    bounds: tuple[int, int] | None = None  # an integer's least and greatest value
    table: str | None = None  # the serve.toml table it sits in ([tls], [cache]); None: the top level
    key: str | None = None  # its key in that table; None: the field's name
    paired: bool = False  # required once its table is given (TLS needs a certificate and a key)
    shown: str | None = None  # how --help and the docs show a default that is None or computed


def _setting(default: Any, **meta: Any) -> Any:
    return dataclasses.field(default=default, metadata={_META: SettingMeta(**meta)})


@dataclass(frozen=True)
class ServeSettings:
    """Everything an operator sets for `lmpack serve`."""

    served_model_name: tuple[str, ...] = _setting((), shown="the bundle's name")
    """Names the model answers to as `model` in requests (a list in serve.toml, comma-separated in the variable);
    the first is listed first by /v1/models and is the `model` of every answer. By default the bundle's or
    release's name, which stays the same across version switches (a variant directory's own name when it is served
    alone); the variant's own name is always accepted too."""
    variant: str | None = _setting(None, shown="lmpack's choice")
    """Serve this variant of a bundle or release (a name `lmpack doctor` lists) instead of the one lmpack would
    choose; it must still run on this host."""
    host: str = _setting("127.0.0.1")
    """Address to bind; loopback unless you say otherwise (0.0.0.0 exposes the API to the network)."""
    port: int = _setting(8000, bounds=(0, 65535))
    """TCP port to listen on."""
    threads: int | None = _setting(None, bounds=(1, 1024), shown="onnxruntime's choice")
    """onnxruntime intra-op threads of the model's session."""
    max_concurrency: int = _setting(1, bounds=(1, 1024))
    """Generations (or embedding batches) running at once; with batching, the sequences in the batch."""
    max_batch: int = _setting(DEFAULT_MAX_BATCH, bounds=(1, 256))
    """Most sequences one decode step runs together; 1 runs each generation alone."""
    batch_align: int = _setting(4, bounds=(1, 64))
    """A sequence joins the batch when its prompt length agrees with the batch's lengths modulo this, which keeps
    answers identical to unbatched ones; 1 joins at once, but int8 answers may then differ."""
    prefill_chunk: int = _setting(256, bounds=(0, 1_000_000))
    """With batching, a new prompt runs this many tokens at a time between the running sequences' decode steps, so
    a long prompt delays their next token by one chunk rather than its whole length; 0 runs each prompt whole."""
    queue: int = _setting(8, bounds=(0, 100_000))
    """Requests that may wait for a slot; beyond that the server answers 429."""
    drain_seconds: int = _setting(30, bounds=(0, 86_400))
    """On SIGTERM or Ctrl-C, how long running requests may take to finish."""
    header_timeout_seconds: int = _setting(10, bounds=(1, 3600))
    """A connection that has not sent a request's headers this long after it opened (or after its last
    answer) is closed; a request in progress is never cut."""
    keep_alive_seconds: int = _setting(5, bounds=(1, 3600))
    """An idle keep-alive connection is closed this long after its last answer."""
    max_connections: int = _setting(1000, bounds=(1, 1_000_000))
    """Connections open at once; one more is closed at once (the queue and 429 bound the requests)."""
    api_key_file: Path | None = _setting(None, shown="none")
    """File of accepted API keys, one a line, # comments (LMPACK_API_KEYS adds comma-separated keys)."""
    max_body_bytes: int = _setting(2 * MIB, bounds=(1024, 1024 * MIB))
    """Request bodies larger than this (counted while reading) get 413."""
    max_tokens_limit: int = _setting(4096, bounds=(1, 1_000_000))
    """The most tokens one request may ask for (max_tokens), also capped by the model's context."""
    default_max_tokens: int = _setting(512, bounds=(1, 1_000_000))
    """A chat completion's token budget when the request sets none, within what the context has room for
    (/v1/completions keeps OpenAI's 16)."""
    tls_cert: Path | None = _setting(None, table="tls", key="cert", paired=True, shown="none")
    """PEM certificate: serve HTTPS (with tls_key)."""
    tls_key: Path | None = _setting(None, table="tls", key="key", paired=True, shown="none")
    """PEM private key of tls_cert."""
    cache: bool = _setting(False, table="cache", key="enabled")
    """Replay answers to repeated deterministic requests (greedy or seeded)."""
    cache_max_entries: int = _setting(1024, table="cache", key="max_entries", bounds=(1, 10_000_000))
    """Most answers the response cache keeps."""
    cache_max_bytes: int = _setting(64 * MIB, table="cache", key="max_bytes", bounds=(1024, 64 * 1024 * MIB))
    """Most bytes of answer text the response cache keeps, least recently used out first."""
    prefix_cache_bytes: int = _setting(128 * MIB, bounds=(0, 1024 * 1024 * MIB))
    """Bytes of KV rows kept for prompts' shared leading blocks (a system prompt, earlier turns), reused by later
    prompts that start the same way, least recently used out first; 0 turns prefix caching off."""
    strict: bool = _setting(False)
    """Refuse to start rather than serve a variant whose TensorRT engine does not fit this host (and cannot be
    rebuilt) on the CUDA provider or the CPU."""
    engine_rebuild: bool = _setting(True)
    """Rebuild a TensorRT engine that does not fit this host from the variant's ONNX, once, and keep it."""
    engine_cache_dir: Path | None = _setting(None, shown="beside the release")
    """Where rebuilt TensorRT engines are kept (default PREFIX/releases/NAME/.engines, or DIR/.engines beside a
    bundle or variant directory)."""


@dataclass(frozen=True)
class SettingInfo:
    """One setting as every reader of it sees it."""

    name: str
    kind: type  # int, str, bool, Path, or tuple (of strings: a setting given several times)
    default: Any
    help: str
    meta: SettingMeta

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return f"LMPACK_SERVE_{self.name.upper()}"

    @property
    def toml_key(self) -> str:
        key = self.meta.key or self.name
        return f"{self.meta.table}.{key}" if self.meta.table else key

    @property
    def shown_default(self) -> str:
        if self.meta.shown is not None:
            return self.meta.shown
        if self.kind is bool:
            return "on" if self.default else "off"
        if self.kind is tuple:
            return ", ".join(self.default) or "none"
        return str(self.default)


@functools.cache
def serve_settings() -> tuple[SettingInfo, ...]:
    """ServeSettings' fields in order, with their types, docstrings and metadata."""
    hints = typing.get_type_hints(ServeSettings)
    docs = _field_docs(ServeSettings)
    infos = []
    for f in fields(ServeSettings):
        hint = hints[f.name]
        kind = (
            tuple
            if typing.get_origin(hint) is tuple
            else next(t for t in typing.get_args(hint) or (hint,) if t is not type(None))
        )
        infos.append(SettingInfo(name=f.name, kind=kind, default=f.default, help=docs[f.name], meta=f.metadata[_META]))
    return tuple(infos)


def serve_setting(name: str) -> SettingInfo:
    """One setting by its field name."""
    return _settings_by_name()[name]


@functools.cache
def _settings_by_name() -> dict[str, SettingInfo]:
    return {info.name: info for info in serve_settings()}


def _field_docs(cls: type) -> dict[str, str]:
    """The string literal after each field of `cls`, joined into one line (vLLM's get_attr_docs)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    class_def = tree.body[0]
    assert isinstance(class_def, ast.ClassDef)  # the source of one class
    body = class_def.body
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    missing = [f.name for f in fields(cls) if f.name not in docs]
    if missing:
        raise TypeError(f"{cls.__name__}: no docstring for {missing}")
    return docs


def settings_table() -> str:
    """docs/serving.md's table of settings, made from ServeSettings."""
    rows = ["| flag | serve.toml | default | meaning |", "|---|---|---|---|"]
    for info in serve_settings():
        flag = f"`{info.flag}`"
        if info.kind is bool:
            flag = f"`{info.flag}/--no-{info.flag[2:]}`"
        elif info.kind is tuple:
            flag = f"`{info.flag} NAME` (repeatable)"
        bounds = f" ({info.meta.bounds[0]} to {info.meta.bounds[1]})" if info.meta.bounds else ""
        rows.append(f"| {flag} | `{info.toml_key}` | {info.shown_default} | {info.help}{bounds} |")
    return "\n".join(rows) + "\n"


# --- reading ---------------------------------------------------------------------------------------------------


def read_serve_file(path: Path) -> dict[str, Any]:
    """The settings a serve.toml sets (only those), checked; paths resolved against the file's folder."""
    path = Path(path)
    top = TableReader(load_toml(path), source=str(path))
    check_schema_version(top)
    readers: dict[str | None, TableReader | None] = {None: top}
    values: dict[str, Any] = {}
    for info in serve_settings():
        table = info.meta.table
        if table not in readers:
            assert table is not None  # the top level (None) is in readers from the start
            readers[table] = top.table(table)
        reader = readers[table]
        if reader is None:
            continue
        value = _read_field(reader, info)
        if value is not None:
            values[info.name] = path.parent / value if info.kind is Path else value
    for reader in readers.values():
        if reader is not None:
            reader.finish()
    return values


def _read_field(reader: TableReader, info: SettingInfo) -> Any:
    key, required = info.meta.key or info.name, info.meta.paired
    if info.kind is int:
        low, high = info.meta.bounds or (None, None)
        return reader.int(key, required=required, minimum=low, maximum=high)
    if info.kind is bool:
        return reader.bool(key, required=required)
    if info.kind is tuple:  # a list of strings, or one string
        values = reader.strings(key)
        return None if values is None else tuple(values)
    return reader.str(key, required=required)


def read_serve_env() -> dict[str, Any]:
    """LMPACK_SERVE_<NAME> values, converted and checked; an error names the variable."""
    values: dict[str, Any] = {}
    for name, raw in paths.serve_env(tuple(info.name for info in serve_settings())).items():
        info = serve_setting(name)
        values[name] = _from_text(raw, info, where=info.env)
    return values


def _from_text(raw: str, info: SettingInfo, *, where: str) -> Any:
    if info.kind is int:
        try:
            number = int(raw)
        except ValueError:
            raise ConfigError(f"{where}={raw!r} is not an integer") from None
        low, high = info.meta.bounds or (number, number)
        if not low <= number <= high:
            raise ConfigError(f"{where}={number} is outside [{low}, {high}]")
        return number
    if info.kind is bool:
        if raw.lower() not in _TRUE | _FALSE:
            raise ConfigError(f"{where}={raw!r} is not true or false (1/0, yes/no, on/off)")
        return raw.lower() in _TRUE
    if info.kind is tuple:  # comma-separated
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    return Path(raw) if info.kind is Path else raw


def resolve_serve_settings(config_file: Path | None, flags: dict[str, Any]) -> ServeSettings:
    """Defaults, then the file, then the environment, then the flags that were given (None: not given)."""
    settings = ServeSettings()
    layers = [
        read_serve_file(config_file) if config_file is not None else {},
        read_serve_env(),
        {k: v for k, v in flags.items() if v is not None and v != ()},  # () is a repeatable flag not given
    ]
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
