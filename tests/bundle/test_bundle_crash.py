"""Crash safety: a real installer process killed with SIGKILL at random moments.

After every kill, what `lmpack list` reports is exactly the old or exactly the new state, `current`
resolves to a release that verifies completely, and the next install leaves the prefix exactly as an
uninterrupted install would (leftovers of the killed one removed).
"""

from __future__ import annotations

import random
import shutil
import signal
import time
from pathlib import Path

import pytest
from bundle_helpers import listed, lmpack_subprocess, pack_bundle, run_cli, snapshot

OLD = [("tiny", "1.0.0", True)]
NEW = [("tiny", "1.0.0", False), ("tiny", "1.1.0", True)]


@pytest.fixture(scope="module")
def crash_bundles(tiny_variant, tmp_path_factory) -> dict[str, Path]:
    """1.0.0 is the tiny variant; 1.1.0 adds 16 MiB of padding so the installer spends most of its life
    verifying and extracting rather than starting Python, and random kills land inside the install."""
    root = tmp_path_factory.mktemp("crash-bundles")
    bigger = root / tiny_variant.name
    shutil.copytree(tiny_variant, bigger)
    (bigger / "model" / "padding.bin").write_bytes(random.Random(1).randbytes(16 << 20))
    return {
        "1.0.0": pack_bundle([tiny_variant], root / "tiny-1.0.0.lmpack", version="1.0.0"),
        "1.1.0": pack_bundle([bigger], root / "tiny-1.1.0.lmpack", version="1.1.0"),
    }


def _template(bundles, root: Path) -> tuple[Path, dict, float]:
    """A prefix holding 1.0.0, the snapshot of the state after installing 1.1.0, and how long that takes."""
    old = root / "old"
    assert run_cli("install", bundles["1.0.0"], "--prefix", old).exit_code == 0
    reference = root / "reference"
    shutil.copytree(old, reference, symlinks=True)
    started = time.perf_counter()
    process = lmpack_subprocess("install", bundles["1.1.0"], "--prefix", reference)
    assert process.wait(timeout=120) == 0, process.stderr.read()
    return old, snapshot(reference), time.perf_counter() - started


def _leftover_kind(extra: set[str]) -> str:
    if any(p.startswith("releases/tiny/1.1.0") or p.startswith("releases/tiny/.current-") for p in extra):
        return "old, release renamed in but not current"
    return "old, killed while staging" if extra else "old, nothing written"


def _kill_loop(bundles, tmp_path: Path, iterations: int, seed: int) -> dict[str, int]:
    old, new_state, duration = _template(bundles, tmp_path)
    old_state = snapshot(old)
    rng = random.Random(seed)
    outcomes: dict[str, int] = {}
    for i in range(iterations):
        prefix = tmp_path / f"run-{i}"
        shutil.copytree(old, prefix, symlinks=True)
        process = lmpack_subprocess("install", bundles["1.1.0"], "--prefix", prefix)
        time.sleep(rng.uniform(0, duration * 1.1))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        state = listed(prefix)
        assert state in (OLD, NEW), (i, state)
        current = prefix / "releases" / "tiny" / "current"
        assert run_cli("verify", current).exit_code == 0, i
        for name, version, _ in state:
            assert run_cli("verify", prefix / "releases" / name / version).exit_code == 0, (i, version)
        if state == OLD:
            # only leftovers nobody lists: staging, a temp link, an uncommitted version directory
            extra = set(snapshot(prefix)) - set(old_state)
            assert all(p.startswith((".staging", "releases/tiny/.current-", "releases/tiny/1.1.0")) for p in extra)
            kind = _leftover_kind(extra)
        else:
            kind = "new" if process.returncode == -signal.SIGKILL else "new, finished before the kill"
        outcomes[kind] = outcomes.get(kind, 0) + 1
        again = lmpack_subprocess("install", bundles["1.1.0"], "--prefix", prefix)
        assert again.wait(timeout=120) == 0, again.stderr.read()
        assert snapshot(prefix) == new_state, i
        assert listed(prefix) == NEW
        shutil.rmtree(prefix)
    return outcomes


def test_installer_killed_at_random_moments(crash_bundles, tmp_path):
    outcomes = _kill_loop(crash_bundles, tmp_path, iterations=20, seed=20250101)
    print("kill outcomes:", outcomes)
    assert sum(outcomes.values()) == 20


@pytest.mark.slow
def test_installer_killed_at_random_moments_200_times(crash_bundles, tmp_path):
    outcomes = _kill_loop(crash_bundles, tmp_path, iterations=200, seed=7)
    print("kill outcomes:", outcomes)
    assert any(k.startswith("old") for k in outcomes) and "new" in outcomes
