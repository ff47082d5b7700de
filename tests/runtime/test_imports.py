"""The runtime must run on a server without the build stack: importing it loads nothing heavy."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = (
    "torch",
    "transformers",
    "optimum",
    "onnx",
    "huggingface_hub",
    "lmpack.steps",
    "lmpack.pipeline",
    "lmpack.cli",
)

CHECK = """
import json, sys
import lmpack.runtime.server, lmpack.runtime.engine, lmpack.runtime.variant, lmpack.runtime.chat
import lmpack.runtime.select, lmpack.runtime.host, lmpack.runtime.cache
print(json.dumps(sorted(sys.modules)))
"""


def test_runtime_imports_nothing_heavy():
    out = subprocess.run(
        [sys.executable, "-c", CHECK],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        cwd=REPO,
    )
    modules = json.loads(out.stdout)
    loaded = [m for m in modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert loaded == [], f"the runtime imported {loaded}"
    assert "lmpack.runtime.server" in modules and "starlette" in modules
    assert "pynvml" not in modules  # NVML is imported only when the host is probed, and only if installed


def test_runtime_sources_import_only_the_runtime():
    """A static check too: a lazy `import torch` inside a function would escape the sys.modules test."""
    names = "|".join(re.escape(name) for name in FORBIDDEN)
    pattern = re.compile(rf"^\s*(?:import|from)\s+(?:{names})(?:[\s.]|$)", re.MULTILINE)
    for path in (REPO / "lmpack" / "runtime").glob("*.py"):
        found = pattern.findall(path.read_text())
        assert not found, f"{path.name}: {found}"
