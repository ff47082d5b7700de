"""The one interface every build step implements, and the artifacts steps pass to each other."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

from lmpack.config.profiles import Profile
from lmpack.config.targets import Target
from lmpack.pipeline.params import NoParams
from lmpack.progress import no_count

# Artifact kinds a step consumes and produces.
SOURCE = "source"  # a model reference before pull: Hub repo, local directory or GGUF file
HF_MODEL = "hf-model"  # a Hugging Face directory with safetensors weights and tokenizer files
ONNX_MODEL = "onnx-model"  # an ONNX model directory with tokenizer files and lmpack-model.json

# The label of the unchanged model's export in a plan, there only when steps before export change the model.
REFERENCE = "reference"


@dataclass(frozen=True)
class Artifact:
    kind: str
    path: Path
    digest: str
    info: dict[str, Any] = field(default_factory=dict)


ProgressFactory = Callable[[str, int], contextlib.AbstractContextManager]


@contextlib.contextmanager
def silent_progress(label: str, total: int) -> Iterator[Callable[[int], None]]:
    yield no_count


@dataclass
class StepContext:
    """What a running step may see beyond its input: the target, the profile, earlier artifacts."""

    target: Target | None = None  # None only where no step depends on it (a plain pull)
    profile: Profile | None = None
    artifacts: dict[str, Artifact] = field(default_factory=dict)
    progress: ProgressFactory = silent_progress
    options: dict[str, Any] = field(default_factory=dict)

    def reference(self) -> Artifact:
        """The unoptimized ONNX export every later step is compared against: the export of the pulled model
        itself, also when steps before export (prune) changed the model."""
        return self.artifacts.get(REFERENCE) or self.artifacts["export"]


class Step:
    """A build step: typed parameters, a plan-time check against the target, and a run into a fresh directory.

    `run` writes its output into `out_dir` (which the runner created empty) and returns a dict of
    measurements for the build report. Steps with `writes_output = False` (validate) only measure;
    their input passes through unchanged.
    """

    name: ClassVar[str]
    consumes: ClassVar[str]
    produces: ClassVar[str]
    Params: ClassVar[type] = NoParams
    uses_target: ClassVar[bool] = False
    writes_output: ClassVar[bool] = True
    tools: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: Any):
        self.params = params

    def check(self, target: Target, profile: Profile) -> None:
        """Raise PlanError when this step cannot run for `target`."""

    def run(self, ctx: StepContext, source: Artifact, out_dir: Path) -> dict[str, Any]:
        raise NotImplementedError

    def finish(self, ctx: StepContext, source: Artifact, metrics: dict[str, Any]) -> None:
        """Called after run or a cache hit; the quality gate lives here, so a cached measurement is still judged."""

    def cache_extra(self, ctx: StepContext) -> dict[str, Any]:
        """Anything besides the input that the output depends on (validate: the reference's digest)."""
        return {}

    def tool_versions(self) -> dict[str, str]:
        """Versions of the libraries the output depends on, plus lmpack's and a digest of the step's code: its own
        module and the modules of its package it takes names from (graph rewrites, file copies), so changing a
        helper invalidates the cached outputs it shaped."""
        from lmpack import __version__

        versions = {"lmpack": __version__, "step_code": _code_digest(type(self))}
        for name in self.tools:
            try:
                versions[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                versions[name] = "absent"
        return versions


def _code_digest(cls: type) -> str:
    import sys

    module = sys.modules[cls.__module__]
    package = cls.__module__.rpartition(".")[0] + "."
    helpers = {
        getattr(value, "__module__", None) or getattr(value, "__name__", None) for value in vars(module).values()
    }
    names = sorted({cls.__module__} | {name for name in helpers if name and name.startswith(package)})
    digest = hashlib.sha256()
    for name in names:
        path = Path(inspect.getsourcefile(sys.modules[name]) or "") if name in sys.modules else Path()
        if not path.is_file():
            return "?"
        digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]
