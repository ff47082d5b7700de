"""Hostile bundles, a table of cases: each names the tool it targets, the tampering, and the refusal expected.

install.py is the first-install script a bare host runs after `tar xzf`; it must refuse anything but regular
files before reading a byte (a FIFO or a link to /dev/zero would block it forever), in the words lmpack
install uses for the same bundle directory.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from bundle_helpers import bundle_members, member, run_cli, write_archive

LISTED = "variants/{variant}/model/tokenizer.json"


def _replace_with_zero_link(path: Path) -> None:
    path.unlink()
    path.symlink_to("/dev/zero")


def _replace_with_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _replace_with_char_device(path: Path) -> None:
    path.unlink()
    os.mknod(path, stat.S_IFCHR | 0o644, os.makedev(1, 5))  # /dev/zero's numbers


def _hard_link_to_another(path: Path) -> None:
    other = path.parent / "config.json"
    path.unlink()
    os.link(other, path)


def _deep_manifest(bundle: Path) -> None:
    (bundle / "manifest.json").write_text('{"files": ' + "[" * 5000 + "]" * 5000 + "}")


# (case, tampering of one listed file, or of the bundle when the path is None; exit code; message of both tools)
CASES = [
    ("symlink to /dev/zero", _replace_with_zero_link, 13, "a symlink; bundles hold regular files only"),
    ("FIFO", _replace_with_fifo, 13, "not a regular file"),
    ("character device", _replace_with_char_device, 13, "not a regular file"),
    ("hard link", _hard_link_to_another, 13, "a hard link; bundles hold regular files only"),
]


@pytest.mark.parametrize("case, tamper, code, message", CASES, ids=[c[0] for c in CASES])
def test_install_py_refuses_special_files_before_reading_as_lmpack_install_does(
    case,
    tamper,
    code,
    message,
    wheel_bundle,
    tmp_path,
):
    if case == "character device" and os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    bundle = shutil.copytree(wheel_bundle["dir"], tmp_path / "tiny")
    variant = next((bundle / "variants").iterdir()).name
    tamper(bundle / LISTED.format(variant=variant))
    done = subprocess.run(
        [sys.executable, str(bundle / "install.py"), "--prefix", str(tmp_path / "prefix")],
        capture_output=True,
        text=True,
        timeout=60,  # the bug was a hang: a read of /dev/zero or a FIFO never ends
        env={"PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == code, done.stderr
    assert message in done.stderr
    assert not (tmp_path / "prefix").exists()
    installed = run_cli("install", bundle, "--prefix", tmp_path / "prefix2")
    assert installed.exit_code == code and message in installed.output


def test_a_manifest_nested_too_deeply_is_a_bundle_error_for_every_tool(wheel_bundle, tmp_path):
    bundle = shutil.copytree(wheel_bundle["dir"], tmp_path / "tiny")
    _deep_manifest(bundle)
    for args in (["verify", bundle], ["install", bundle, "--prefix", tmp_path / "prefix"]):
        result = run_cli(*args)
        assert result.exit_code == 12 and "internal error" not in result.output, result.output
        assert "nested" in result.output
    done = subprocess.run(
        [sys.executable, str(bundle / "install.py"), "--prefix", str(tmp_path / "prefix")],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 12 and "Traceback" not in done.stderr, done.stderr


ARCHIVE_CASES = [
    ("manifest not the first member", lambda m: m.append(m.pop(0)), "must be manifest.json"),
    ("signature out of place", lambda m: m.append(member("manifest.sig", b"{}")), "out of place"),
]


@pytest.mark.parametrize("case, reorder, message", ARCHIVE_CASES, ids=[c[0] for c in ARCHIVE_CASES])
def test_install_py_given_the_archive_checks_the_archive_itself(case, reorder, message, wheel_bundle, tmp_path):
    """Once unpacked, member order is gone; `install.py --archive FILE` installs from the tarball, so the
    archive's own rules (manifest first, signature second) hold for the first install too."""
    members = bundle_members(wheel_bundle["dir"])
    reorder(members)
    archive = write_archive(tmp_path / "hostile.lmpack", members)
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    with tarfile.open(archive) as tf:
        tf.extractall(unpacked, filter="data")
    (unpacked / "install.py").chmod(0o755)
    done = subprocess.run(
        [sys.executable, str(unpacked / "install.py"), "--prefix", str(tmp_path / "prefix"), "--archive", str(archive)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 12 and message in done.stderr, done.stderr
    assert not (tmp_path / "prefix" / "releases").exists()


def test_install_py_refuses_an_archive_that_is_not_the_unpacked_bundle(wheel_bundle, bundles, tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(wheel_bundle["dir"] / "install.py"),
            "--prefix",
            str(tmp_path / "prefix"),
            "--archive",
            str(bundles["1.0.0"]),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 12 and "is not the bundle unpacked" in done.stderr, done.stderr
