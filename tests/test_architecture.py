"""The layers of docs/architecture.md, enforced: which lmpack package may import which, lazy imports included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lmpack"

# What each part of lmpack may import from the rest of lmpack (besides itself and the package's __version__).
# Imports flow downward only: cli > api > steps > pipeline, runtime, agent > bundle > config > fsio, nvml > errors;
# fleet sits beside api, over runtime.
MAY_IMPORT = {
    "errors": set(),
    "progress": set(),  # the phase-line callback type: as low as errors
    "data": set(),  # the evaluation texts, read as resources
    "fsio": {"errors", "progress"},
    "nvml": {"errors", "progress"},
    "config": {"errors", "progress", "fsio"},
    "bundle": {"errors", "progress", "fsio", "config"},
    "pipeline": {"errors", "progress", "fsio", "config", "bundle"},
    "runtime": {"errors", "progress", "fsio", "nvml", "config", "bundle"},
    "agent": {"errors", "progress", "fsio", "nvml", "config", "bundle"},
    # the fleet runs the runtime's server in Ray Serve replicas and installs bundles on every node
    "fleet": {"errors", "progress", "fsio", "nvml", "config", "bundle", "runtime"},
    "steps": {"errors", "progress", "data", "fsio", "nvml", "config", "bundle", "pipeline", "runtime"},
    "api": {"errors", "progress", "data", "fsio", "nvml", "config", "bundle", "pipeline", "runtime", "agent", "steps"},
    "cli": {
        *("errors", "progress", "data", "fsio", "nvml", "config", "bundle", "pipeline", "runtime", "agent", "steps"),
        *("api", "fleet"),
    },
    "__main__": {"cli"},
}
# The bundle's build side: the serving half (runtime, agent) must install and run without it.
BUILD_SIDE_BUNDLE = {"lmpack.bundle.pack", "lmpack.bundle.wheels", "lmpack.bundle.sbom"}
VERSION_ONLY = {"lmpack", "lmpack.__version__"}  # `from lmpack import __version__`


def _part(path: Path) -> str:
    relative = path.relative_to(PACKAGE).with_suffix("")
    return relative.parts[0]


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every lmpack import in the file, at any depth (a lazy import counts the same)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            found.append((node.lineno, "<relative>"))
    return [(line, name) for line, name in found if name == "<relative>" or name.split(".")[0] == "lmpack"]


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_part_of_the_package_has_a_rule():
    assert {_part(path) for path in SOURCES if path.name != "__init__.py" or path.parent != PACKAGE} <= set(MAY_IMPORT)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_flow_downward_only(path):
    if path.parent == PACKAGE and path.name == "__init__.py":
        return
    part = _part(path)
    wrong = []
    for line, name in _imports(path):
        if name == "<relative>":
            wrong.append(f"line {line}: a relative import (lmpack spells its imports absolutely)")
            continue
        if name in VERSION_ONLY:
            continue
        target = name.split(".")[1]
        if target != part and target not in MAY_IMPORT[part]:
            wrong.append(f"line {line}: {name} ({part} may import {sorted(MAY_IMPORT[part]) or 'nothing of lmpack'})")
        if part in ("runtime", "agent") and any(name == m or name.startswith(m + ".") for m in BUILD_SIDE_BUNDLE):
            wrong.append(f"line {line}: {name} is the bundle's build side; the serving half runs without it")
    assert not wrong, f"{path.relative_to(PACKAGE)}:\n  " + "\n  ".join(wrong)


def test_the_rule_catches_an_upward_import(tmp_path, monkeypatch):
    """The check itself can fail: a runtime module that reaches up into the build steps is reported."""
    fake = PACKAGE / "runtime" / "not_a_real_module.py"
    monkeypatch.setattr(Path, "read_text", lambda self, **_: "def f():\n    from lmpack.steps import STEPS\n")
    with pytest.raises(AssertionError, match="lmpack.steps"):
        test_imports_flow_downward_only(fake)
