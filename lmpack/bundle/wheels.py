"""The offline wheelhouse: lmpack's own wheel plus the binary wheels of its `runtime` extra, for one target.

The air-gapped server installs lmpack's runtime half from these wheels only (`--no-index`,
`--require-hashes`, binary only), so everything it needs is resolved here, on the connected build host,
for the target's platform tag and Python rather than the build host's. Sdists are refused: building
one on the server would need a compiler and run arbitrary setup code. The build stack (torch,
transformers, optimum) must never reach the wheelhouse; if a dependency drags one in, packing fails
instead of shipping gigabytes the runtime must not import.

A target with a GPU gets the `runtime-gpu` extra instead: onnxruntime-gpu in place of onnxruntime (never
both: they install the same module, and the second would silently replace the first), nvidia-ml-py for
NVML, and, unless the target says the vendor's OS image provides CUDA (`cuda_wheels = false`, Jetson),
NVIDIA's CUDA runtime wheels through onnxruntime-gpu's `cuda` and `cudnn` extras. The NVIDIA driver and
TensorRT never come from here (docs/airgapped-install.md).

Build-side: runs pip (and hatchling, through pip's build isolation) as subprocesses.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lmpack.errors import BundleError

WHEELS_DIR = "wheels"
LOCK_NAME = "requirements.lock"
LOCK_PATH = f"{WHEELS_DIR}/{LOCK_NAME}"
RUNTIME_EXTRA = "runtime"
RUNTIME_GPU_EXTRA = "runtime-gpu"
FLEET_EXTRA = "fleet"  # Ray Serve, for `lmpack fleet` (docs/scale-out.md)
OPTIONAL_EXTRAS = (FLEET_EXTRA,)  # what `lmpack pack --extra` may add to the runtime
# onnxruntime-gpu's extras that pull NVIDIA's CUDA runtime wheels (nvidia-cuda-runtime, -cudnn, -cublas, ...).
CUDA_RUNTIME = "onnxruntime-gpu[cuda,cudnn]"
FORBIDDEN = ("torch", "transformers", "optimum", "optimum-onnx")  # the build half; never on the server
# Pairs that install the same module: a wheelhouse carrying both would leave whichever pip installed last.
EXCLUSIVE = (("onnxruntime", "onnxruntime-gpu"),)
_WHEEL_RE = re.compile(r"^(?P<name>[A-Za-z0-9_.]+)-(?P<version>[A-Za-z0-9_.!+]+)(-\d[^-]*)?-[^-]+-[^-]+-[^-]+\.whl\Z")
_MANYLINUX_RE = re.compile(r"^manylinux_2_(?P<minor>\d+)_(?P<arch>x86_64|aarch64)\Z")
_PIP_TIMEOUT_S = 900


@dataclass(frozen=True)
class Wheel:
    filename: str
    name: str  # normalised (PEP 503)
    version: str
    sha256: str
    size: int


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_wheel_name(filename: str) -> tuple[str, str]:
    """(normalised name, version) from a wheel file name; anything else (an sdist above all) is refused."""
    match = _WHEEL_RE.match(filename)
    if not match:
        raise BundleError(f"{filename} is not a wheel; a bundle ships binary wheels only, never sdists")
    return normalise(match["name"]), match["version"]


def compatible_platforms(platform_tag: str) -> list[str]:
    """A manylinux_2_N tag and every older glibc tag a host with glibc 2.N also runs.

    pip's `--platform` matches the given tags literally, so without this list it would miss the many
    wheels still published as manylinux2014 (glibc 2.17).
    """
    match = _MANYLINUX_RE.match(platform_tag)
    if not match:
        return [platform_tag]
    arch, newest = match["arch"], int(match["minor"])
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(newest, 16, -1)] + [f"manylinux2014_{arch}"]
    return tags


def project_root() -> Path:
    """lmpack's source tree, from which its own wheel is built."""
    root = Path(__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or 'name = "lmpack"' not in pyproject.read_text():
        raise BundleError(
            "pack --wheels builds lmpack's own wheel from its source tree, and none was found "
            f"above {Path(__file__).parent}",
            hint="run lmpack pack from a source checkout of lmpack",
        )
    return root


def _pip(args: list[str], source: Path | None) -> None:
    """Run pip; with a local `source` directory, offline and deaf to the host's pip configuration."""
    base = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    if source is not None:
        base += ["--isolated"]
        args = [*args, "--no-index", "--find-links", str(source)]
    try:
        done = subprocess.run(base + args, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise BundleError(f"pip took longer than {_PIP_TIMEOUT_S} s: {' '.join(args[:2])}") from exc
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
        raise BundleError(
            f"pip {args[0]} failed while making the wheelhouse:\n{tail}",
            hint="check the build host's access to the package index, or pass --wheel-source DIR",
        )


@dataclass(frozen=True)
class RuntimeSet:
    """What a wheelhouse resolves besides lmpack itself: one runtime extra of lmpack's, optional extras on top
    of it (OPTIONAL_EXTRAS), plus further requirements."""

    extra: str = RUNTIME_EXTRA
    extra_requirements: tuple[str, ...] = ()
    extras: tuple[str, ...] = ()

    def requirements(self, own_wheel: str) -> list[str]:
        return [f"{own_wheel}[{','.join((self.extra, *self.extras))}]", *self.extra_requirements]


def runtime_set(targets: list[dict], extras: tuple[str, ...] = ()) -> RuntimeSet:
    """The runtime packages for variants built for `targets` (Target.to_dict()): GPU ones when any has a GPU,
    since onnxruntime-gpu runs the CPU variants too; CUDA runtime wheels unless every GPU target has the
    vendor's own CUDA (cuda_wheels = false). `extras`: optional extras of OPTIONAL_EXTRAS to add."""
    if unknown := sorted(set(extras) - set(OPTIONAL_EXTRAS)):
        raise BundleError(f"unknown wheelhouse extra {', '.join(unknown)}; known: {', '.join(OPTIONAL_EXTRAS)}")
    gpus = [t["gpu"] for t in targets if t.get("gpu")]
    if not gpus:
        return RuntimeSet(extras=extras)
    cuda = any(gpu.get("cuda_wheels", True) for gpu in gpus)
    return RuntimeSet(RUNTIME_GPU_EXTRA, (CUDA_RUNTIME,) if cuda else (), extras)


def build_wheelhouse(
    destination: Path, *, platform_tag: str, python: str, source: Path | None = None, runtime: RuntimeSet = RuntimeSet()
) -> list[Wheel]:
    """Fill `destination` with lmpack's wheel and its runtime closure for the target; return them sorted."""
    destination.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lmpack-own-wheel-") as scratch:
        _pip(["wheel", "--no-deps", "--wheel-dir", scratch, str(project_root())], source)
        own = sorted(Path(scratch).glob("lmpack-*.whl"))
        if len(own) != 1:
            raise BundleError(f"building lmpack's own wheel gave {len(own)} wheels instead of one")
        platforms = [arg for tag in compatible_platforms(platform_tag) for arg in ("--platform", tag)]
        _pip(
            [
                "download",
                "--only-binary=:all:",
                *platforms,
                "--python-version",
                python,
                "--implementation",
                "cp",
                "--dest",
                str(destination),
                *runtime.requirements(str(own[0])),
            ],
            source,
        )
    wheels = describe(destination)
    if "lmpack" not in {w.name for w in wheels}:
        raise BundleError("lmpack's own wheel is missing from the wheelhouse")
    return wheels


def describe(directory: Path) -> list[Wheel]:
    """Every file in a wheelhouse as a Wheel; refuses sdists, duplicates and the build stack."""
    wheels: list[Wheel] = []
    for path in sorted(directory.iterdir()):
        name, version = parse_wheel_name(path.name)
        data = path.read_bytes()
        wheels.append(
            Wheel(
                filename=path.name, name=name, version=version, sha256=hashlib.sha256(data).hexdigest(), size=len(data)
            )
        )
    if banned := sorted({w.name for w in wheels} & set(FORBIDDEN)):
        raise BundleError(
            f"the runtime wheelhouse would contain {', '.join(banned)}, which belong to the build half only",
            hint="find the runtime dependency that pulls it in and drop or pin it",
        )
    names = [w.name for w in wheels]
    for pair in EXCLUSIVE:
        if set(pair) <= set(names):
            raise BundleError(
                f"the wheelhouse would contain both {' and '.join(pair)}, which install the same module",
                hint="a GPU target's wheelhouse carries onnxruntime-gpu only; drop the dependency "
                "that pulls in the other",
            )
    if len(set(names)) != len(names):
        raise BundleError(f"the wheelhouse holds two versions of one package: {sorted(names)}")
    return wheels


def lock_text(wheels: list[Wheel]) -> str:
    """pip's --require-hashes format: one pinned line per wheel, so pip installs exactly these files."""
    lines = ["# lmpack runtime wheelhouse: pip install --no-index --require-hashes --only-binary=:all: -r this"]
    lines += [f"{w.name}=={w.version} --hash=sha256:{w.sha256}" for w in wheels]
    return "\n".join(lines) + "\n"


def prefetch(destination: Path, *, platform_tag: str, python: str, runtime: RuntimeSet = RuntimeSet()) -> list[Wheel]:
    """Fill a local wheel directory that later packs can use offline (`--wheel-source`).

    It holds the runtime closure for the target plus hatchling and its dependencies for this host,
    which pip's build isolation needs to build lmpack's own wheel without an index. scripts/setup runs
    it, so the test suite packs real wheelhouses without touching the network.
    """
    wheels = build_wheelhouse(destination, platform_tag=platform_tag, python=python, runtime=runtime)
    for own in destination.glob("lmpack-*.whl"):  # rebuilt from the source tree at every pack
        own.unlink()
    _pip(["download", "--only-binary=:all:", "--dest", str(destination), "hatchling"], None)
    return [w for w in wheels if w.name != "lmpack"]


if __name__ == "__main__":  # python -m lmpack.bundle.wheels DEST PLATFORM_TAG PYTHON [cpu|gpu|gpu-no-cuda] [EXTRA...]
    kind = sys.argv[4] if len(sys.argv) > 4 else "cpu"
    chosen = {
        "cpu": RuntimeSet(),
        "gpu": RuntimeSet(RUNTIME_GPU_EXTRA, (CUDA_RUNTIME,)),
        "gpu-no-cuda": RuntimeSet(RUNTIME_GPU_EXTRA),
    }[kind]
    chosen = RuntimeSet(chosen.extra, chosen.extra_requirements, tuple(sys.argv[5:]))
    fetched = prefetch(Path(sys.argv[1]), platform_tag=sys.argv[2], python=sys.argv[3], runtime=chosen)
    print(f"{len(fetched)} runtime wheels, {sum(w.size for w in fetched) / 1e6:.1f} MB in {sys.argv[1]}")
