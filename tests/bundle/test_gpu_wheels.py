"""The wheelhouse of a GPU target: onnxruntime-gpu instead of onnxruntime, nvidia-ml-py, CUDA runtime wheels.

The real onnxruntime-gpu wheel is about 250 MB and NVIDIA's CUDA wheels several hundred more, so the
resolution is tested offline with stand-in wheels that carry the real packages' names, tags and
dependency metadata (onnxruntime-gpu's `cuda` and `cudnn` extras as PyPI declares them), next to the
real runtime wheels scripts/setup fetched. pip itself does the resolving, as in a real pack.
"""

from __future__ import annotations

import json
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
from bundle_helpers import REPO, WHEEL_CACHE

from lmpack import api
from lmpack.bundle.wheels import (
    CUDA_RUNTIME,
    RUNTIME_EXTRA,
    RUNTIME_GPU_EXTRA,
    RuntimeSet,
    describe,
    normalise,
    runtime_set,
)
from lmpack.errors import BundleError


def test_each_shipped_target_gets_its_runtime_packages():
    sets = {t.name: runtime_set([t.to_dict()]) for t in api.targets()}
    for name in ("cpu-x86", "cpu-x86-avx512", "cpu-arm64"):
        assert sets[name] == RuntimeSet(RUNTIME_EXTRA, ())
    for name in ("t4", "a100", "l4", "h100"):
        assert sets[name] == RuntimeSet(RUNTIME_GPU_EXTRA, (CUDA_RUNTIME,)), name
    assert sets["jetson-orin"] == RuntimeSet(RUNTIME_GPU_EXTRA, ())  # JetPack brings CUDA
    # One GPU variant makes the whole bundle's wheelhouse a GPU one: onnxruntime-gpu runs the CPU variants too.
    mixed = runtime_set([api.target("cpu-x86").to_dict(), api.target("a100").to_dict()])
    assert mixed.extra == RUNTIME_GPU_EXTRA
    assert RuntimeSet(RUNTIME_GPU_EXTRA, (CUDA_RUNTIME,)).requirements("lmpack.whl") == [
        "lmpack.whl[runtime-gpu]",
        "onnxruntime-gpu[cuda,cudnn]",
    ]


def _extras() -> dict[str, list[str]]:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def _names(requirements: list[str]) -> set[str]:
    import re

    return {normalise(re.split(r"[<>=~!;\[ ]", r, maxsplit=1)[0]) for r in requirements}


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib")
def test_the_gpu_extra_is_the_runtime_extra_with_the_gpu_packages_and_never_both_onnxruntimes():
    extras = _extras()
    runtime, gpu = extras[RUNTIME_EXTRA], extras[RUNTIME_GPU_EXTRA]
    assert _names(gpu) == (_names(runtime) - {"onnxruntime"}) | {"onnxruntime-gpu", "nvidia-ml-py"}
    assert set(gpu) - set(runtime) == {"onnxruntime-gpu>=1.20", "nvidia-ml-py>=12.0"}
    assert not {"onnxruntime", "onnxruntime-gpu"} <= _names(gpu)


def _wheel(
    directory: Path, name: str, version: str, tag: str, requires: tuple[str, ...] = (), extras: tuple[str, ...] = ()
) -> Path:
    """A stand-in wheel: the dist-info pip reads (name, version, tags, dependencies) and nothing else."""
    dist = f"{name.replace('-', '_')}-{version}"
    path = directory / f"{dist}-{tag}.whl"
    metadata = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    metadata += [f"Provides-Extra: {e}" for e in extras] + [f"Requires-Dist: {r}" for r in requires]
    files = {
        f"{dist}.dist-info/METADATA": "\n".join(metadata) + "\n",
        f"{dist}.dist-info/WHEEL": f"Wheel-Version: 1.0\nGenerator: lmpack-tests\nRoot-Is-Purelib: false\nTag: {tag}\n",
    }
    files[f"{dist}.dist-info/RECORD"] = "".join(f"{f},,\n" for f in [*files, f"{dist}.dist-info/RECORD"])
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
    return path


def test_a_wheelhouse_with_both_onnxruntimes_is_refused(tmp_path):
    _wheel(tmp_path, "onnxruntime", "1.20.1", "cp311-cp311-manylinux_2_28_x86_64")
    _wheel(tmp_path, "onnxruntime-gpu", "1.20.1", "cp311-cp311-manylinux_2_28_x86_64")
    with pytest.raises(BundleError, match="both onnxruntime and onnxruntime-gpu, which install the same module"):
        describe(tmp_path)


@pytest.fixture
def gpu_wheel_source(tmp_path) -> Path:
    """The real runtime wheels (onnxruntime among them: it must not be picked), plus stand-ins for the GPU
    packages with the metadata PyPI has for them."""
    if not any(WHEEL_CACHE.glob("onnxruntime-*.whl")):
        pytest.skip(f"{WHEEL_CACHE} has no runtime wheels; scripts/setup fills it (python -m lmpack.bundle.wheels)")
    source = tmp_path / "wheels"
    shutil.copytree(WHEEL_CACHE, source)
    linux = "manylinux_2_28_x86_64"
    _wheel(
        source,
        "onnxruntime-gpu",
        "1.31.1",
        f"cp311-cp311-{linux}",
        extras=("cuda", "cudnn"),
        requires=(
            "numpy>=1.21.6",
            'nvidia-cuda-runtime~=13.0; extra == "cuda"',
            'nvidia-cublas~=13.0; extra == "cuda"',
            'nvidia-cudnn-cu13~=9.0; extra == "cudnn"',
        ),
    )
    _wheel(source, "nvidia-ml-py", "13.580.82", "py3-none-any")
    _wheel(source, "nvidia-cuda-runtime", "13.0.96", "py3-none-manylinux_2_27_x86_64")
    _wheel(source, "nvidia-cublas", "13.1.0.3", "py3-none-manylinux_2_27_x86_64")
    _wheel(source, "nvidia-cudnn-cu13", "9.13.0.50", "py3-none-manylinux_2_27_x86_64", requires=("nvidia-cublas",))
    return source


def _gpu_variant(tiny_variant: Path, destination: Path, target: str) -> Path:
    shutil.copytree(tiny_variant, destination)
    meta = json.loads((destination / "variant.json").read_text())
    meta["target"] = api.target(target).to_dict()
    if target == "jetson-orin":  # same platform as the real wheels, so only cuda_wheels differs
        meta["target"].update(platform_tag="manylinux_2_28_x86_64", python="3.11")
    (destination / "variant.json").write_text(json.dumps(meta))
    return destination


@pytest.mark.parametrize("target, cuda", [("a100", True), ("jetson-orin", False)])
def test_pip_resolves_the_gpu_runtime_for_a_gpu_target(tiny_variant, gpu_wheel_source, tmp_path, target, cuda):
    from lmpack.bundle.pack import WheelOptions, pack

    variant = _gpu_variant(tiny_variant, tmp_path / f"tiny-{target}-fp16", target)
    pack(
        [variant],
        tmp_path / "gpu.lmpack",
        name="gpu",
        version="1.0.0",
        keep_dir=tmp_path / "gpu",
        wheels=WheelOptions(source=gpu_wheel_source),
    )
    lock = (tmp_path / "gpu" / "wheels" / "requirements.lock").read_text()
    names = {line.split("==")[0] for line in lock.splitlines() if not line.startswith("#")}
    assert {"lmpack", "onnxruntime-gpu", "nvidia-ml-py", "tokenizers", "numpy"} <= names
    assert "onnxruntime" not in names
    cuda_wheels = {"nvidia-cuda-runtime", "nvidia-cublas", "nvidia-cudnn-cu13"}
    assert (cuda_wheels <= names) if cuda else not (cuda_wheels & names)
