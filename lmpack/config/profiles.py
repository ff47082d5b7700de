"""Optimization profiles: an ordered list of build steps and the quality gate, read from profiles/*.toml."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmpack.config import paths
from lmpack.config.catalog import Catalog
from lmpack.config.targets import PRECISIONS
from lmpack.config.toml_reader import TableReader, check_schema_version, load_toml
from lmpack.errors import ConfigError


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


_CATALOG: Catalog[Profile] = Catalog(
    kind="profile",
    search_dirs=lambda: [paths.user_profiles_dir(), paths.shipped_profiles_dir()],
    load_file=load_profile_file,
)


def list_profiles() -> list[Profile]:
    """Every known profile, user directory first; a name found twice keeps the user's."""
    return _CATALOG.all()


def load_profile(name_or_path: str) -> Profile:
    """A profile by name (user dir, then shipped) or by path to a .toml file."""
    return _CATALOG.get(name_or_path)
