"""Typed step parameters: small frozen dataclasses filled from a profile's TOML table."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal, get_args, get_origin

from lmpack.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class NoParams:
    pass


def params_from_dict(cls: type, data: dict[str, Any], *, where: str) -> Any:
    """Build `cls` from `data`; unknown keys, wrong types and values outside a Literal are ConfigErrors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown parameter '{unknown[0]}'; known: {', '.join(fields) or 'none'}")
    values = {}
    for name, value in data.items():
        values[name] = _coerce(value, hints[name], where=f"{where}: parameter '{name}'")
    try:
        params = cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    validate = getattr(params, "validate", None)
    if validate is not None:
        problem = validate()
        if problem:
            raise ConfigError(f"{where}: {problem}")
    return params


def _coerce(value: Any, hint: Any, *, where: str) -> Any:
    origin = get_origin(hint)
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            raise ConfigError(f"{where} is {value!r}; expected one of: {', '.join(map(repr, choices))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item_hint, *_) = get_args(hint) or (Any,)
        items = [_coerce(v, item_hint, where=where) for v in value]
        return tuple(items) if origin is tuple else items
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if isinstance(value, bool) != (hint is bool) or not isinstance(value, hint):
            raise ConfigError(f"{where} must be {hint.__name__}, got {value!r}")
    return value
