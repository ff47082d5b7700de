"""Strict, typed reading of TOML tables: every error names the file and the field."""

from __future__ import annotations

import builtins
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, overload

import tomllib

from lmpack.errors import ConfigError, NotFoundError

SCHEMA_VERSION = 1


def load_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file; a syntax error becomes a ConfigError with the file and line."""
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise NotFoundError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


class TableReader:
    """Reads fields out of one TOML table, remembering which were used so unknown keys are rejected."""

    def __init__(self, data: dict[builtins.str, Any], *, source: builtins.str, prefix: builtins.str = ""):
        self._data = data
        self._used: set[str] = set()
        self.source = source
        self.prefix = prefix

    def _where(self, key: builtins.str) -> builtins.str:
        return f"{self.source}: field '{self.prefix}{key}'"

    def _get(self, key: builtins.str, expected: type | tuple[type, ...], default: Any, required: builtins.bool) -> Any:
        self._used.add(key)
        if key not in self._data:
            if required:
                raise ConfigError(f"{self._where(key)} is required")
            return default
        value = self._data[key]
        # bool is a subclass of int: a boolean is never accepted where a number is expected.
        if isinstance(value, bool) and bool not in _as_tuple(expected):
            raise ConfigError(f"{self._where(key)} must be {_type_names(expected)}, got {value!r}")
        if not isinstance(value, expected):
            raise ConfigError(f"{self._where(key)} must be {_type_names(expected)}, got {value!r}")
        return value

    # Each reader returns the field's value, or `default` when it is absent (an error when `required`): the
    # overloads tell the type checker that a default or `required=True` never gives None.
    @overload
    def str(
        self,
        key: builtins.str,
        default: builtins.str,
        *,
        required: builtins.bool = ...,
        choices: Iterable[builtins.str] | None = ...,
    ) -> builtins.str: ...
    @overload
    def str(
        self,
        key: builtins.str,
        default: None = ...,
        *,
        required: Literal[True],
        choices: Iterable[builtins.str] | None = ...,
    ) -> builtins.str: ...
    @overload
    def str(
        self,
        key: builtins.str,
        default: None = ...,
        *,
        required: builtins.bool = ...,
        choices: Iterable[builtins.str] | None = ...,
    ) -> builtins.str | None: ...
    def str(
        self,
        key: builtins.str,
        default: builtins.str | None = None,
        *,
        required: builtins.bool = False,
        choices: Iterable[builtins.str] | None = None,
    ) -> builtins.str | None:
        value = self._get(key, str, default, required)
        if value is not None and choices is not None and value not in set(choices):
            raise ConfigError(f"{self._where(key)} is {value!r}; expected one of: {', '.join(sorted(choices))}")
        return value

    @overload
    def int(
        self,
        key: builtins.str,
        default: builtins.int,
        *,
        required: builtins.bool = ...,
        minimum: builtins.int | None = ...,
        maximum: builtins.int | None = ...,
    ) -> builtins.int: ...
    @overload
    def int(
        self,
        key: builtins.str,
        default: None = ...,
        *,
        required: Literal[True],
        minimum: builtins.int | None = ...,
        maximum: builtins.int | None = ...,
    ) -> builtins.int: ...
    @overload
    def int(
        self,
        key: builtins.str,
        default: None = ...,
        *,
        required: builtins.bool = ...,
        minimum: builtins.int | None = ...,
        maximum: builtins.int | None = ...,
    ) -> builtins.int | None: ...
    def int(
        self,
        key: builtins.str,
        default: builtins.int | None = None,
        *,
        required: builtins.bool = False,
        minimum: builtins.int | None = None,
        maximum: builtins.int | None = None,
    ) -> builtins.int | None:
        value = self._get(key, int, default, required)
        _check_range(self._where(key), value, minimum, maximum)
        return value

    @overload
    def float(
        self,
        key: builtins.str,
        default: builtins.float,
        *,
        required: builtins.bool = ...,
        minimum: builtins.float | None = ...,
        maximum: builtins.float | None = ...,
    ) -> builtins.float: ...
    @overload
    def float(
        self,
        key: builtins.str,
        default: None = ...,
        *,
        required: Literal[True],
        minimum: builtins.float | None = ...,
        maximum: builtins.float | None = ...,
    ) -> builtins.float: ...
    @overload
    def float(
        self,
        key: builtins.str,
        default: None = ...,
        *,
        required: builtins.bool = ...,
        minimum: builtins.float | None = ...,
        maximum: builtins.float | None = ...,
    ) -> builtins.float | None: ...
    def float(
        self,
        key: builtins.str,
        default: builtins.float | None = None,
        *,
        required: builtins.bool = False,
        minimum: builtins.float | None = None,
        maximum: builtins.float | None = None,
    ) -> builtins.float | None:
        value = self._get(key, (int, float), default, required)
        value = None if value is None else float(value)
        _check_range(self._where(key), value, minimum, maximum)
        return value

    @overload
    def bool(self, key: builtins.str, default: builtins.bool, *, required: builtins.bool = ...) -> builtins.bool: ...
    @overload
    def bool(self, key: builtins.str, default: None = ..., *, required: Literal[True]) -> builtins.bool: ...
    @overload
    def bool(
        self, key: builtins.str, default: None = ..., *, required: builtins.bool = ...
    ) -> builtins.bool | None: ...
    def bool(
        self, key: builtins.str, default: builtins.bool | None = None, *, required: builtins.bool = False
    ) -> builtins.bool | None:
        return self._get(key, bool, default, required)

    def str_list(
        self,
        key: builtins.str,
        default: list[builtins.str] | None = None,
        *,
        required: builtins.bool = False,
        choices: Iterable[builtins.str] | None = None,
    ) -> list[builtins.str]:
        value = self._get(key, list, default if default is not None else [], required)
        allowed = set(choices) if choices is not None else None
        for item in value:
            if not isinstance(item, str):
                raise ConfigError(f"{self._where(key)} must be a list of strings, got {item!r}")
            if allowed is not None and item not in allowed:
                raise ConfigError(f"{self._where(key)} has {item!r}; expected items from: {', '.join(sorted(allowed))}")
        return list(value)

    @overload
    def table(self, key: builtins.str, *, required: Literal[True]) -> TableReader: ...
    @overload
    def table(self, key: builtins.str, *, required: builtins.bool = ...) -> TableReader | None: ...
    def table(self, key: builtins.str, *, required: builtins.bool = False) -> TableReader | None:
        value = self._get(key, dict, None, required)
        if value is None:
            return None
        return TableReader(value, source=self.source, prefix=f"{self.prefix}{key}.")

    def tables(self, key: builtins.str, *, required: builtins.bool = False) -> list[TableReader]:
        value = self._get(key, list, [], required)
        readers = []
        for index, item in enumerate(value):
            if not isinstance(item, dict):
                raise ConfigError(f"{self._where(key)}[{index}] must be a table")
            readers.append(TableReader(item, source=self.source, prefix=f"{self.prefix}{key}[{index}]."))
        return readers

    def strings(self, key: builtins.str) -> list[builtins.str] | None:
        """A list of non-empty strings, or one string as a list of one; None when absent."""
        value = self._get(key, (str, list), None, False)
        if value is None:
            return None
        items = [value] if isinstance(value, str) else value
        for item in items:
            if not isinstance(item, str) or not item.strip():
                raise ConfigError(f"{self._where(key)} must be a non-empty string or a list of them, got {item!r}")
        return list(items)

    def rest(self) -> dict[builtins.str, Any]:
        """The fields not read yet, for a nested model (step parameters) to validate itself."""
        return {k: v for k, v in self._data.items() if k not in self._used}

    def finish(self) -> None:
        """Reject any key that no reader asked for: a typo must not be silently ignored."""
        unknown = sorted(set(self._data) - self._used)
        if unknown:
            raise ConfigError(f"{self.source}: unknown field '{self.prefix}{unknown[0]}'")


def check_schema_version(reader: TableReader) -> int:
    version = reader.int("schema_version", required=True)
    if version != SCHEMA_VERSION:
        raise ConfigError(
            f"{reader.source}: schema_version {version} is not supported (this lmpack reads {SCHEMA_VERSION})",
            hint="upgrade lmpack or rewrite the file for this version",
        )
    return version


def _as_tuple(expected: type | tuple[type, ...]) -> tuple[type, ...]:
    return expected if isinstance(expected, tuple) else (expected,)


def _type_names(expected: type | tuple[type, ...]) -> str:
    names = {
        "str": "a string",
        "int": "an integer",
        "float": "a number",
        "bool": "true or false",
        "list": "a list",
        "dict": "a table",
    }
    return " or ".join(names.get(t.__name__, t.__name__) for t in _as_tuple(expected))


def _check_range(where: str, value: float | None, minimum: float | None, maximum: float | None) -> None:
    if value is None:
        return
    if minimum is not None and value < minimum:
        raise ConfigError(f"{where} is {value}; must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{where} is {value}; must be at most {maximum}")
