"""Named TOML records (targets, profiles) found by name in the user's directory, then the shipped one, or by path."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from lmpack.errors import ConfigError, NotFoundError


class _Named(Protocol):
    @property
    def name(self) -> str: ...


Record = TypeVar("Record", bound=_Named)


@dataclass(frozen=True)
class Catalog(Generic[Record]):
    kind: str  # "target" or "profile", for messages
    search_dirs: Callable[[], list[Path]]  # user directory first, so a user file overrides a shipped one by name
    load_file: Callable[[Path], Record]

    def all(self) -> list[Record]:
        """Every known record; a name found twice keeps the first (the user's)."""
        found: dict[str, Record] = {}
        for directory in self.search_dirs():
            if directory.is_dir():
                for path in sorted(directory.glob("*.toml")):
                    record = self.load_file(path)
                    found.setdefault(record.name, record)
        return sorted(found.values(), key=lambda r: r.name)

    def get(self, name_or_path: str) -> Record:
        """A record by name, or by path to a .toml file."""
        candidate = Path(name_or_path)
        if name_or_path.endswith(".toml") or candidate.is_file():
            if not candidate.is_file():
                raise NotFoundError(f"{self.kind} file {name_or_path} does not exist")
            return self.load_file(candidate)
        for directory in self.search_dirs():
            path = directory / f"{name_or_path}.toml"
            if path.is_file():
                record = self.load_file(path)
                if record.name != name_or_path:
                    raise ConfigError(
                        f"{path}: field 'name' is {record.name!r} but the file is named {name_or_path}.toml"
                    )
                return record
        known = ", ".join(r.name for r in self.all())
        raise NotFoundError(
            f"unknown {self.kind} {name_or_path!r}; known {self.kind}s: {known}",
            hint=f"lmpack {self.kind}s list, or pass --{self.kind} ./my-{self.kind}.toml",
        )
