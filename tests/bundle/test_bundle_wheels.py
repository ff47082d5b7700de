"""The offline wheelhouse, SBOM, install.py, release venv, install policy and systemd units (issue 3, part 2).

Packs use the local wheel directory that scripts/setup fills (.wheels-cache): the tests never reach the
network. The air-gapped test installs inside `unshare -n` and generates text from the release's own venv.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest
from bundle_helpers import run_cli

HOST_MATCHES_CPU_X86 = sys.platform == "linux" and os.uname().machine == "x86_64" and sys.version_info[:2] == (3, 11)


def test_wheelhouse_lock_manifest_and_sbom(wheel_bundle):
    from lmpack.bundle.manifest import parse_manifest
    from lmpack.bundle.wheels import FORBIDDEN

    bundle = wheel_bundle["dir"]
    manifest = parse_manifest((bundle / "manifest.json").read_bytes())
    assert manifest.schema_version == 2 and manifest.wheelhouse is not None
    assert manifest.wheelhouse.platform_tag == "manylinux_2_28_x86_64" and manifest.wheelhouse.python == "3.11"
    wheels = sorted((bundle / "wheels").glob("*.whl"))
    assert manifest.wheelhouse.wheels == len(wheels)
    assert manifest.wheelhouse.bytes == sum(w.stat().st_size for w in wheels)
    assert not list((bundle / "wheels").glob("*.tar.gz")) and not list((bundle / "wheels").glob("*.zip"))
    lock = [line for line in (bundle / "wheels/requirements.lock").read_text().splitlines() if not line.startswith("#")]
    assert len(lock) == len(wheels)
    names = {line.split("==")[0] for line in lock}
    assert all(" --hash=sha256:" in line for line in lock)
    assert {"lmpack", "onnxruntime", "tokenizers", "numpy"} <= names and not names & set(FORBIDDEN)
    for required in ("install.py", "sbom.cdx.json", "wheels/requirements.lock"):
        assert required in manifest.by_path
    assert manifest.by_path["install.py"].mode == 0o755
    sbom = json.loads((bundle / "sbom.cdx.json").read_text())
    assert sbom["bomFormat"] == "CycloneDX" and sbom["specVersion"] == "1.5"
    purls = {c["purl"] for c in sbom["components"] if c["type"] == "library"}
    assert len(purls) == len(wheels) and any(p.startswith("pkg:pypi/onnxruntime@") for p in purls)
    model = [c for c in sbom["components"] if c["type"] == "file"]
    assert {c["name"] for c in model} == {p for p in manifest.by_path if p.startswith("variants/")}
    assert all(c["hashes"][0]["content"] == manifest.by_path[c["name"]].sha256 for c in model)
    assert run_cli("verify", wheel_bundle["tar"]).exit_code == 0


def test_the_build_stack_and_sdists_are_refused(tmp_path):
    from lmpack.bundle.wheels import compatible_platforms, describe
    from lmpack.errors import BundleError

    (tmp_path / "torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"x")
    with pytest.raises(BundleError, match="torch"):
        describe(tmp_path)
    (tmp_path / "torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl").unlink()
    (tmp_path / "jinja2-3.1.6.tar.gz").write_bytes(b"x")
    with pytest.raises(BundleError, match="sdists"):
        describe(tmp_path)
    tags = compatible_platforms("manylinux_2_28_aarch64")
    assert tags[0] == "manylinux_2_28_aarch64" and "manylinux2014_aarch64" in tags and "manylinux_2_17_aarch64" in tags


def test_pure_python_ed25519_agrees_with_cryptography(bundles):
    from lmpack.bundle import ed25519

    manifest = (bundles["1.0.0-signed-dir"] / "manifest.json").read_bytes()
    signature = base64.b64decode(json.loads((bundles["1.0.0-signed-dir"] / "manifest.sig").read_text())["signature"])
    raw = ed25519.public_key_from_pem(bundles["pub"].read_bytes())
    assert raw is not None and ed25519.verify(raw, manifest, signature)
    assert not ed25519.verify(raw, manifest + b" ", signature)
    other = ed25519.public_key_from_pem(bundles["other-pub"].read_bytes())
    assert not ed25519.verify(other, manifest, signature)


def test_host_policy_requires_signatures(bundles, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(bundles["pub"], home / "release.pub")
    (home / "install.toml").write_text('schema_version = 1\nrequire_signature = true\npublic_keys = ["release.pub"]\n')
    monkeypatch.setenv("LMPACK_HOME", str(home))
    refused = run_cli("install", bundles["1.0.0"], "--prefix", tmp_path / "prefix")
    assert refused.exit_code == 13 and "requires signed bundles" in refused.output
    assert not (tmp_path / "prefix" / "releases").exists()
    accepted = run_cli("install", bundles["1.0.0-signed"], "--prefix", tmp_path / "prefix", "--json")
    assert accepted.exit_code == 0, accepted.output
    assert json.loads(accepted.stdout)["signature"] == "valid"


@pytest.mark.skipif(not HOST_MATCHES_CPU_X86, reason="the wheelhouse is for cpu-x86 (x86_64, CPython 3.11)")
def test_air_gapped_first_install_and_generate(wheel_bundle, tmp_path):
    """Unpack, run install.py with no network at all, then generate from the release's own venv."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) to run the install without a network namespace")
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -n is not permitted here")
    unpacked, prefix, units = tmp_path / "tiny", tmp_path / "prefix", tmp_path / "units"
    unpacked.mkdir()
    with tarfile.open(wheel_bundle["tar"]) as tf:
        tf.extractall(unpacked, filter="data")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # no PYTHONPATH, no pip settings: a bare host
    done = subprocess.run(
        [
            "unshare",
            "-n",
            sys.executable,
            str(unpacked / "install.py"),
            "--prefix",
            str(prefix),
            "--systemd-dir",
            str(units),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    current = prefix / "releases" / "tiny" / "current"
    lmpack = current / "venv" / "bin" / "lmpack"
    variant = next((current / "variants").iterdir())
    generated = subprocess.run(
        ["unshare", "-n", str(lmpack), "generate", str(variant), "The history of", "--max-tokens", "8"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.strip()
    probe = "import sys, lmpack.runtime; print(sorted({'torch', 'transformers', 'optimum'} & set(sys.modules)))"
    light = subprocess.run(
        [str(current / "venv" / "bin" / "python"), "-c", probe], capture_output=True, text=True, env=env, timeout=120
    )
    assert light.stdout.strip() == "[]", light.stderr
    assert run_cli("verify", current).exit_code == 0  # the venv is not part of the release's contents
    unit = (units / "lmpack-serve@.service").read_text()
    assert f"{prefix.resolve()}/releases/%i/current/venv/bin/lmpack serve" in unit
    agent_unit = (units / "lmpack-agent@.service").read_text()
    assert (
        f"{prefix.resolve()}/releases/%i/current/venv/bin/lmpack agent --config /etc/lmpack/agent-%i.toml" in agent_unit
    )
    if shutil.which("systemd-analyze"):
        for instance in ("lmpack-serve@tiny.service", "lmpack-agent@tiny.service"):
            check = subprocess.run(
                ["systemd-analyze", "verify", str(units / instance)], capture_output=True, text=True, timeout=60
            )
            assert check.returncode == 0, check.stderr


def test_a_failing_venv_leaves_nothing_installed(wheel_bundle, tmp_path):
    """A Python that passes the version check but cannot make a venv: the extracted release is removed."""
    from bundle_helpers import listed

    fake = tmp_path / "python3.11"
    fake.write_text('#!/bin/sh\nif [ "$1" = "-c" ]; then echo 3.11; else exit 1; fi\n')
    fake.chmod(0o755)
    prefix = tmp_path / "prefix"
    broken = run_cli("install", wheel_bundle["tar"], "--prefix", prefix, "--python", fake)
    assert broken.exit_code == 14 and "venv" in broken.output
    assert listed(prefix) == [] and not (prefix / "releases" / "tiny" / "1.0.0").exists()
    wrong = run_cli("install", wheel_bundle["tar"], "--prefix", prefix, "--python", "/bin/false")
    assert wrong.exit_code == 14 and "Python 3.11" in wrong.output


@pytest.mark.skipif(not HOST_MATCHES_CPU_X86, reason="the wheelhouse is for cpu-x86 (x86_64, CPython 3.11)")
def test_installer_killed_while_making_the_venv(wheel_bundle, tmp_path):
    """kill -9 while pip fills RELEASE/venv: nothing is listed, and the next install completes cleanly."""
    from bundle_helpers import listed, lmpack_subprocess

    prefix = tmp_path / "prefix"
    process = lmpack_subprocess("install", wheel_bundle["tar"], "--prefix", prefix)
    venv_python = prefix / "releases" / "tiny" / "1.0.0" / "venv" / "bin" / "python"
    deadline = time.monotonic() + 120
    while not venv_python.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # inside venv creation or pip install
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the install finished before the kill"
    assert listed(prefix) == []
    again = lmpack_subprocess("install", wheel_bundle["tar"], "--prefix", prefix)
    assert again.wait(timeout=600) == 0, again.stderr.read()
    assert listed(prefix) == [("tiny", "1.0.0", True)]
    assert run_cli("verify", prefix / "releases" / "tiny" / "current").exit_code == 0


def test_a_flipped_byte_in_a_wheel_is_refused_before_install(wheel_bundle, tmp_path):
    bundle = shutil.copytree(wheel_bundle["dir"], tmp_path / "tampered")
    wheel = next((bundle / "wheels").glob("numpy-*.whl"))
    data = bytearray(wheel.read_bytes())
    data[len(data) // 2] ^= 0x01
    wheel.write_bytes(bytes(data))
    prefix = tmp_path / "prefix"
    result = run_cli("install", bundle, "--prefix", prefix)
    assert result.exit_code == 13, result.output
    assert wheel.name in result.stderr
    assert not (prefix / "releases").exists() or not any((prefix / "releases").iterdir())
