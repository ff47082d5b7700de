"""Fixtures for bundle tests: the session's tiny variant, bundles packed from it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from bundle_helpers import WHEEL_CACHE, pack_bundle


@pytest.fixture(scope="session")
def tiny_variant(llama_variant) -> Path:
    """A real int8 cpu-x86 variant of the tiny Llama (tests/conftest.py: built, or written without the build half)."""
    return llama_variant


@pytest.fixture(scope="session")
def second_variant(tiny_variant, tmp_path_factory) -> Path:
    """The same real files under a second variant name, for multi-variant bundles."""
    target = tmp_path_factory.mktemp("variants2") / "tiny-copy-cpu-x86-int8"
    shutil.copytree(tiny_variant, target)
    return target


@pytest.fixture(scope="session")
def bundles(tiny_variant, tmp_path_factory) -> dict[str, Path]:
    """Read-only reference bundles: v1.0.0 and v1.1.0 (tarballs and directories), keys, a signed v1.0.0."""
    from lmpack.bundle import pack, signing

    root = tmp_path_factory.mktemp("bundles")
    made: dict[str, Path] = {}
    for version in ("1.0.0", "1.1.0"):
        made[version] = pack_bundle(
            [tiny_variant], root / f"tiny-{version}.lmpack", version=version, keep_dir=root / f"tiny-{version}"
        )
        made[f"{version}-dir"] = root / f"tiny-{version}"
    made["key"], made["pub"], _ = signing.keygen(root / "keys" / "release")
    made["other-key"], made["other-pub"], _ = signing.keygen(root / "keys" / "other")
    signed = root / "signed"
    signed.mkdir()
    for version in ("1.0.0", "1.1.0"):
        made[f"{version}-signed"] = signed / f"tiny-{version}.lmpack"
        shutil.copy(made[version], made[f"{version}-signed"])
        pack.sign_bundle(made[f"{version}-signed"], made["key"])
        made[f"{version}-signed-dir"] = signed / f"tiny-{version}"
        shutil.copytree(made[f"{version}-dir"], made[f"{version}-signed-dir"])
        pack.sign_bundle(made[f"{version}-signed-dir"], made["key"])
    return made


@pytest.fixture(scope="session")
def wheel_bundle(tiny_variant, tmp_path_factory) -> dict[str, Path]:
    """A cpu-x86 bundle with its wheelhouse, as a tarball and a directory (packed offline from .wheels-cache)."""
    if not any(WHEEL_CACHE.glob("onnxruntime-*.whl")):
        pytest.skip(f"{WHEEL_CACHE} has no runtime wheels; scripts/setup fills it (python -m lmpack.bundle.wheels)")
    from lmpack.bundle.pack import WheelOptions, pack

    root = tmp_path_factory.mktemp("wheel-bundle")
    result = pack(
        [tiny_variant],
        root / "tiny.lmpack",
        name="tiny",
        version="1.0.0",
        keep_dir=root / "tiny",
        wheels=WheelOptions(source=WHEEL_CACHE),
    )
    return {"tar": result.path, "dir": root / "tiny", "seconds": result.seconds}
