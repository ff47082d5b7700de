"""`lmpack pack --wheels --extra fleet`: a bundle whose wheelhouse carries Ray Serve, installed offline."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from lmpack.bundle.manifest import MANIFEST, parse_manifest

REPO_CACHE = Path(__file__).resolve().parents[2] / ".wheels-cache"  # scripts/setup fills it


@pytest.mark.slow
def test_a_bundle_packed_with_the_fleet_extra_installs_ray_serve_offline(llama_variant, tmp_path, lmpack_cli):
    if not any(REPO_CACHE.glob("ray-*.whl")):
        pytest.skip(
            f"{REPO_CACHE} has no Ray wheel; scripts/setup fetches it (python -m lmpack.bundle.wheels ... fleet)"
        )
    sizes = {}
    for extra in ((), ("--extra", "fleet")):
        out = tmp_path / f"tiny{len(extra)}.lmpack"
        args = ["pack", llama_variant, "-o", out, "--name", "tiny", "--version", "1.0.0", "--wheels"]
        result = lmpack_cli(*args, "--wheel-source", REPO_CACHE, *extra, "--json")
        assert result.exit_code == 0, result.output
        with tarfile.open(out) as tf:
            manifest = parse_manifest(tf.extractfile(MANIFEST).read())
        wheels = {f.path.split("/")[1].split("-")[0].lower() for f in manifest.files if f.path.startswith("wheels/")}
        sizes[bool(extra)] = (manifest.wheelhouse.wheels, manifest.wheelhouse.bytes)
        assert ("ray" in wheels) == bool(extra)
    print(
        f"\n[fleet wheelhouse] without the fleet extra {sizes[False][0]} wheels, {sizes[False][1] / 1e6:.1f} MB; "
        f"with it {sizes[True][0]} wheels, {sizes[True][1] / 1e6:.1f} MB"
    )
    unpacked, prefix = tmp_path / "unpacked", tmp_path / "prefix"
    unpacked.mkdir()
    with tarfile.open(tmp_path / "tiny2.lmpack") as tf:
        tf.extractall(unpacked, filter="data")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # no pip settings: only the bundle's wheels
    done = subprocess.run(
        [sys.executable, str(unpacked / "install.py"), "--prefix", str(prefix)],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    venv = prefix / "releases" / "tiny" / "current" / "venv" / "bin"
    probe = "import ray, ray.serve, lmpack.fleet.replica; print(ray.__version__)"
    imported = subprocess.run([str(venv / "python"), "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip().startswith("2.")
    helped = subprocess.run(
        [str(venv / "lmpack"), "fleet", "deploy", "--help"], capture_output=True, text=True, env=env
    )
    assert helped.returncode == 0 and "--max-replicas" in helped.stdout
