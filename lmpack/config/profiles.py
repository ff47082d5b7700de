"""Optimization profiles: an ordered list of build steps and the quality gate, read from profiles/*.toml."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmpack.config import paths
from lmpack.config.targets import PRECISIONS
from lmpack.config.toml_reader import TableReader, check_schema_version, load_toml
from lmpack.errors import ConfigError, NotFoundError


@dataclass(frozen=True)
class StepSpec:
    """One step of a profile: its registered name and its raw parameters (validated by the step)."""

    name: str
    params: dict[str, Any]
    where: str


@dataclass(frozen=True)
class QualityGate:
    """How far the optimized model may drift from the fp32 reference."""

    max_perplexity_increase: float = 0.02
    min_top1_agreement: float = 0.0
    min_cosine_similarity: float = 0.99


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    precision: str
    steps: list[StepSpec]
    quality: QualityGate = field(default_factory=QualityGate)
    source: str = ""


def parse_profile(data: dict, *, source: str) -> Profile:
    r = TableReader(data, source=source)
    check_schema_version(r)
    steps = []
    for step_table in r.tables("steps", required=True):
        name = step_table.str("name", required=True)
        steps.append(StepSpec(name=name, params=step_table.rest(), where=f"{source}: {step_table.prefix.rstrip('.')}"))
    if not steps:
        raise ConfigError(f"{source}: field 'steps' must list at least one step")
    quality = QualityGate()
    if (q := r.table("quality")) is not None:
        quality = QualityGate(
            max_perplexity_increase=q.float("max_perplexity_increase", 0.02, minimum=0.0),
            min_top1_agreement=q.float("min_top1_agreement", 0.0, minimum=0.0, maximum=1.0),
            min_cosine_similarity=q.float("min_cosine_similarity", 0.99, minimum=-1.0, maximum=1.0),
        )
        q.finish()
    profile = Profile(
        name=r.str("name", required=True),
        description=r.str("description", ""),
        precision=r.str("precision", required=True, choices=PRECISIONS),
        steps=steps,
        quality=quality,
        source=source,
    )
    r.finish()
    return profile


def load_profile_file(path: Path) -> Profile:
    return parse_profile(load_toml(path), source=str(path))


def _search_dirs() -> list[Path]:
    return [paths.user_profiles_dir(), paths.shipped_profiles_dir()]


def list_profiles() -> list[Profile]:
    found: dict[str, Profile] = {}
    for directory in _search_dirs():
        if not directory.is_dir():
            continue
        for path in sorted(directory.glob("*.toml")):
            profile = load_profile_file(path)
            found.setdefault(profile.name, profile)
    return sorted(found.values(), key=lambda p: p.name)


def load_profile(name_or_path: str) -> Profile:
    """A profile by name (user dir, then shipped) or by path to a .toml file."""
    candidate = Path(name_or_path)
    if name_or_path.endswith(".toml") or candidate.is_file():
        if not candidate.is_file():
            raise NotFoundError(f"profile file {name_or_path} does not exist")
        return load_profile_file(candidate)
    for directory in _search_dirs():
        path = directory / f"{name_or_path}.toml"
        if path.is_file():
            profile = load_profile_file(path)
            if profile.name != name_or_path:
                raise ConfigError(f"{path}: field 'name' is {profile.name!r} but the file is named {name_or_path}.toml")
            return profile
    known = ", ".join(p.name for p in list_profiles())
    raise NotFoundError(f"unknown profile {name_or_path!r}; known profiles: {known}",
                        hint="lmpack profiles list, or pass --profile ./my-profile.toml")
