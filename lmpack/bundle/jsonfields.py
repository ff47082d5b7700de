"""Strict reading of JSON objects for the manifest: every field typed, unknown and duplicate keys refused.

Split out of manifest.py so the format's rules stay readable there; nothing else should need it.
Runtime-side: standard library and lmpack.errors only.
"""

from __future__ import annotations

import builtins
import re
from typing import Any, Literal, overload

from lmpack.errors import BundleError

MANIFEST = "manifest.json"


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        duplicate = next(k for k in keys if keys.count(k) > 1)
        raise BundleError(f"{MANIFEST}: key {duplicate!r} appears twice in one object")
    return dict(pairs)


def no_constants(name: str) -> Any:
    raise BundleError(f"{MANIFEST}: {name} is not valid JSON")


class Fields:
    """Reads one JSON object field by field; `finish` rejects fields nobody asked for."""

    def __init__(self, value: Any, where: builtins.str):
        if not isinstance(value, dict):
            raise BundleError(f"{MANIFEST}: {where or 'the document'} must be an object")
        self.data: dict[builtins.str, Any] = value
        self.where = where
        self.seen: set[builtins.str] = set()

    def _field(self, key: builtins.str) -> builtins.str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: builtins.str, types: tuple[type, ...], *, nullable: builtins.bool = False) -> Any:
        self.seen.add(key)
        if key not in self.data:
            raise BundleError(f"{MANIFEST}: field '{self._field(key)}' is missing")
        value = self.data[key]
        if value is None and nullable:
            return None
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise BundleError(f"{MANIFEST}: field '{self._field(key)}' has the wrong type ({type(value).__name__})")
        return value

    # A field read with `nullable=False` (the default) is never None: the overloads say so to the type checker.
    @overload
    def str(
        self,
        key: builtins.str,
        pattern: re.Pattern[builtins.str] | None = ...,
        *,
        nullable: Literal[False] = ...,
        max_len: builtins.int = ...,
    ) -> builtins.str: ...
    @overload
    def str(
        self,
        key: builtins.str,
        pattern: re.Pattern[builtins.str] | None = ...,
        *,
        nullable: builtins.bool,
        max_len: builtins.int = ...,
    ) -> builtins.str | None: ...
    def str(
        self,
        key: builtins.str,
        pattern: re.Pattern[builtins.str] | None = None,
        *,
        nullable: builtins.bool = False,
        max_len: builtins.int = 4096,
    ) -> builtins.str | None:
        value = self.get(key, (str,), nullable=nullable)
        if value is not None and (len(value) > max_len or (pattern is not None and not pattern.match(value))):
            raise BundleError(f"{MANIFEST}: field '{self._field(key)}' has an invalid value {value[:80]!r}")
        return value

    def int(self, key: builtins.str, minimum: builtins.int, maximum: builtins.int) -> builtins.int:
        value = self.get(key, (int,))
        if not minimum <= value <= maximum:
            raise BundleError(f"{MANIFEST}: field '{self._field(key)}' = {value} is outside [{minimum}, {maximum}]")
        return value

    def list(self, key: builtins.str, max_items: builtins.int) -> builtins.list[Any]:
        value = self.get(key, (list,))
        if len(value) > max_items:
            raise BundleError(f"{MANIFEST}: field '{self._field(key)}' has more than {max_items} items")
        return value

    @overload
    def obj(self, key: builtins.str, *, nullable: Literal[False] = ...) -> Fields: ...
    @overload
    def obj(self, key: builtins.str, *, nullable: builtins.bool) -> Fields | None: ...
    def obj(self, key: builtins.str, *, nullable: builtins.bool = False) -> Fields | None:
        value = self.get(key, (dict,), nullable=nullable)
        return None if value is None else Fields(value, self._field(key))

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise BundleError(f"{MANIFEST}: unknown field '{self._field(unknown[0])}'")
