"""Install, list, uninstall, upgrade and downgrade flows on real bundles; the runtime half stays light."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import namedtuple

import pytest
from bundle_helpers import REPO, listed, pack_bundle, run_cli, snapshot

from lmpack.bundle import install as installing


def _install(bundle, prefix, *extra):
    result = run_cli("install", bundle, "--prefix", prefix, "--json", *extra)
    return result, (json.loads(result.stdout) if result.stdout else None)


def test_install_lays_out_a_verified_release(bundles, tmp_path):
    prefix = tmp_path / "p"
    result, out = _install(bundles["1.0.0-signed"], prefix, "--public-key", bundles["pub"])
    assert result.exit_code == 0, result.output
    assert out["action"] == "installed" and out["signature"] == "valid" and out["previous"] is None
    release = prefix / "releases" / "tiny" / "1.0.0"
    assert os.readlink(prefix / "releases" / "tiny" / "current") == "1.0.0"
    assert (release / "manifest.json").read_bytes() == (bundles["1.0.0-signed-dir"] / "manifest.json").read_bytes()
    assert (release / "manifest.sig").is_file()
    assert sorted(p.name for p in prefix.iterdir()) == ["releases"]  # no staging or lock file left
    assert run_cli("verify", prefix / "releases" / "tiny" / "current", "--public-key", bundles["pub"]).exit_code == 0
    assert listed(prefix) == [("tiny", "1.0.0", True)]


def test_upgrade_keeps_the_previous_release_and_downgrade_needs_its_flag(bundles, tmp_path):
    prefix = tmp_path / "p"
    assert _install(bundles["1.0.0"], prefix)[0].exit_code == 0
    result, out = _install(bundles["1.1.0-dir"], prefix)  # an unpacked directory installs the same way
    assert result.exit_code == 0 and out["previous"] == "1.0.0"
    assert listed(prefix) == [("tiny", "1.0.0", False), ("tiny", "1.1.0", True)]
    before = snapshot(prefix)
    result, out = _install(bundles["1.0.0"], prefix)
    assert result.exit_code == 14 and "--allow-downgrade" in out["error"]["hint"]
    assert snapshot(prefix) == before
    result, out = _install(bundles["1.0.0"], prefix, "--allow-downgrade")
    assert result.exit_code == 0 and out["action"] == "switched"  # already there: verified again, then switched
    assert listed(prefix) == [("tiny", "1.0.0", True), ("tiny", "1.1.0", False)]
    result, out = _install(bundles["1.0.0"], prefix)
    assert result.exit_code == 0 and out["action"] == "unchanged"


def test_same_version_with_other_contents_is_refused(bundles, tiny_variant, second_variant, tmp_path):
    prefix = tmp_path / "p"
    assert _install(bundles["1.0.0"], prefix)[0].exit_code == 0
    other = pack_bundle([tiny_variant, second_variant], tmp_path / "other.lmpack", version="1.0.0")
    before = snapshot(prefix)
    result, out = _install(other, prefix)
    assert result.exit_code == 14 and "different contents" in out["error"]["message"]
    assert snapshot(prefix) == before


def test_switching_back_verifies_the_kept_release(bundles, tmp_path):
    prefix = tmp_path / "p"
    _install(bundles["1.0.0"], prefix)
    _install(bundles["1.1.0"], prefix)
    kept = prefix / "releases" / "tiny" / "1.0.0"
    victim = next(p for p in kept.rglob("model.onnx"))
    victim.write_bytes(victim.read_bytes()[:-1] + b"\0")
    result, out = _install(bundles["1.0.0"], prefix, "--allow-downgrade")
    assert result.exit_code == 13 and "model.onnx" in out["error"]["message"]
    assert listed(prefix)[-1] == ("tiny", "1.1.0", True)


def test_uninstall(bundles, tmp_path):
    prefix = tmp_path / "p"
    _install(bundles["1.0.0"], prefix)
    _install(bundles["1.1.0"], prefix)
    result = run_cli("uninstall", "tiny", "1.1.0", "--prefix", prefix)
    assert result.exit_code == 14 and "current" in result.stderr
    assert run_cli("uninstall", "tiny", "9.9.9", "--prefix", prefix).exit_code == 4
    assert run_cli("uninstall", "../tiny", "1.0.0", "--prefix", prefix).exit_code == 12
    assert run_cli("uninstall", "tiny", "../../x", "--prefix", prefix).exit_code == 12
    result = run_cli("uninstall", "tiny", "1.0.0", "--prefix", prefix, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["removed"]["version"] == "1.0.0"
    assert not (prefix / "releases" / "tiny" / "1.0.0").exists()
    assert listed(prefix) == [("tiny", "1.1.0", True)]
    assert run_cli("uninstall", "tiny", "1.1.0", "--prefix", prefix, "--force").exit_code == 0
    assert listed(prefix) == [] and not (prefix / "releases" / "tiny").exists()
    assert "nothing installed" in run_cli("list", "--prefix", prefix).stdout
    assert run_cli("list", "--prefix", tmp_path / "missing").exit_code == 4


def test_free_space_is_checked_first(bundles, tmp_path, monkeypatch):
    prefix = tmp_path / "p"
    prefix.mkdir()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(installing.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    result = run_cli("install", bundles["1.0.0"], "--prefix", prefix)
    assert result.exit_code == 9 and "MB free" in result.stderr
    assert snapshot(prefix) == {}


def test_disk_full_while_extracting_leaves_the_prefix_unchanged(bundles, tmp_path, monkeypatch):
    import errno

    from lmpack.bundle import verify

    prefix = tmp_path / "p"
    _install(bundles["1.0.0"], prefix)
    before = snapshot(prefix)
    real_drain, calls = verify.drain, []

    def filling_drain(stream, entry, fd=None):
        calls.append(entry.path)
        if len(calls) == 3:
            os.write(fd, b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", entry.path)
        return real_drain(stream, entry, fd)

    monkeypatch.setattr(verify, "drain", filling_drain)
    result = run_cli("install", bundles["1.1.0"], "--prefix", prefix)
    assert result.exit_code == 9 and "nothing partial" in result.stderr
    assert snapshot(prefix) == before


def test_read_only_file_system_at_the_last_step_leaves_the_prefix_unchanged(bundles, tmp_path, monkeypatch):
    import errno

    prefix = tmp_path / "p"
    _install(bundles["1.0.0"], prefix)
    before = snapshot(prefix)

    def read_only(src, dst):
        raise OSError(errno.EROFS, "Read-only file system", str(dst))

    monkeypatch.setattr(installing.os, "rename", read_only)
    result = run_cli("install", bundles["1.1.0"], "--prefix", prefix)
    assert result.exit_code == 14 and "cannot write" in result.stderr
    monkeypatch.undo()
    assert snapshot(prefix) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_read_only_prefix(bundles, tmp_path):
    prefix = tmp_path / "p"
    prefix.mkdir()
    prefix.chmod(0o555)
    try:
        result = run_cli("install", bundles["1.0.0"], "--prefix", prefix)
        assert result.exit_code == 14 and "cannot write" in result.stderr
    finally:
        prefix.chmod(0o755)


def test_a_second_installer_is_refused_while_one_holds_the_prefix(bundles, tmp_path):
    import fcntl

    prefix = tmp_path / "p"
    prefix.mkdir()
    fd = os.open(prefix, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        result = run_cli("install", bundles["1.0.0"], "--prefix", prefix)
        assert result.exit_code == 14 and "running" in result.stderr
    finally:
        os.close(fd)


def test_leftovers_of_an_interrupted_install_are_invisible_then_removed(bundles, tmp_path):
    prefix = tmp_path / "p"
    _install(bundles["1.0.0"], prefix)
    name_dir = prefix / "releases" / "tiny"
    shutil.copytree(name_dir / "1.0.0", name_dir / "1.1.0")  # renamed in, never made current
    (prefix / ".staging" / "tiny-1.2.0-x").mkdir(parents=True)
    os.symlink("1.1.0", name_dir / ".current-dead")
    assert listed(prefix) == [("tiny", "1.0.0", True)]
    result, out = _install(bundles["1.1.0"], prefix)
    assert result.exit_code == 0 and out["action"] == "installed"
    assert sorted(p.name for p in prefix.iterdir()) == ["releases"]
    assert sorted(p.name for p in name_dir.iterdir()) == [".installed", "1.0.0", "1.1.0", "current"]


def test_a_kill_right_after_the_commit_is_completed_by_the_next_run(bundles, tmp_path):
    prefix = tmp_path / "p"
    _install(bundles["1.0.0"], prefix)
    _install(bundles["1.1.0"], prefix)
    reference = snapshot(prefix)
    (prefix / "releases" / "tiny" / ".installed" / "1.1.0").unlink()  # as if killed before the last step
    assert listed(prefix) == [("tiny", "1.0.0", False), ("tiny", "1.1.0", True)]
    result, out = _install(bundles["1.1.0"], prefix)
    assert result.exit_code == 0 and out["action"] == "unchanged"
    assert snapshot(prefix) == reference


def test_runtime_modules_import_nothing_heavy():
    code = (
        "import sys\n"
        "import lmpack.bundle.manifest, lmpack.bundle.archive, lmpack.bundle.signing, lmpack.bundle.verify, "
        "lmpack.bundle.install\n"
        "heavy = ('torch', 'transformers', 'optimum', 'onnx', 'onnxruntime', 'huggingface_hub', 'numpy', "
        "'cryptography', 'lmpack.steps', 'lmpack.pipeline', 'lmpack.cli', 'lmpack.api', 'click')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m.startswith(heavy)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_a_killed_installs_venv_processes_are_ended_by_the_next_install(tmp_path):
    """What making a venv starts runs in process groups the install records; a killed install leaves them
    running (ensurepip's pip outlives its parent), and the next install ends them before it removes the
    leftover release. A recorded group whose processes do not name the prefix (its number reused) is spared."""
    import subprocess
    import sys
    import time

    from lmpack.bundle.releases import CHILDREN
    from lmpack.bundle.runtime_env import reap_children

    prefix = tmp_path / "prefix"
    prefix.mkdir()
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    ours = subprocess.Popen([*sleeper, str(prefix.resolve() / "releases" / "tiny" / "1.0.0")], start_new_session=True)
    other = subprocess.Popen([*sleeper, "unrelated"], start_new_session=True)
    try:
        (prefix / CHILDREN).write_text(f"{ours.pid}\n{other.pid}\n")
        started = time.monotonic()
        reap_children(prefix / CHILDREN)
        assert ours.wait(timeout=5) == -9 and time.monotonic() - started < 10
        assert other.poll() is None  # its command line does not name the prefix
        assert not (prefix / CHILDREN).exists()
    finally:
        for process in (ours, other):
            process.kill()
            process.wait()
