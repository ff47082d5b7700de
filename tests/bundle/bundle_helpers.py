"""Helpers shared by the bundle tests: packing, snapshots of a prefix, hand-made archives, the CLI."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from click.testing import CliRunner

from lmpack.cli.main import cli

REPO = Path(__file__).resolve().parents[2]
WHEEL_CACHE = REPO / ".wheels-cache"  # runtime wheels scripts/setup fetches, for offline packs


def pack_bundle(
    variants: list[Path], output: Path, *, name: str = "tiny", version: str = "1.0.0", keep_dir: Path | None = None
) -> Path:
    from lmpack.bundle.pack import pack

    return pack(variants, output, name=name, version=version, keep_dir=keep_dir).path


def run_cli(*args: str):
    """Run lmpack in-process; returns the Click result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(cli, [str(a) for a in args])


def lmpack_subprocess(*args: str, **kwargs) -> subprocess.Popen:
    """A real `python -m lmpack` process (for kill tests), running this worktree's code."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "lmpack", *map(str, args)],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kwargs,
    )


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under root (hidden ones included): file digests, link targets, directories, modes."""
    if not root.exists():
        return {}
    state: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_symlink():
            state[relative] = f"link:{os.readlink(path)}"
        elif path.is_dir():
            state[relative] = "dir"
        else:
            state[relative] = f"file:{oct(path.stat().st_mode & 0o777)}:{hashlib.sha256(path.read_bytes()).hexdigest()}"
    return state


def listed(prefix: Path) -> list[tuple[str, str, bool]]:
    """What `lmpack list --json` reports, as (name, version, current) triples."""
    result = run_cli("list", "--prefix", prefix, "--json")
    assert result.exit_code == 0, result.output
    return [(r["name"], r["version"], r["current"]) for r in json.loads(result.stdout)["releases"]]


def member(
    name: str, data: bytes = b"", *, kind: bytes = tarfile.REGTYPE, size: int | None = None, linkname: str = ""
) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if size is None else size
    info.linkname = linkname
    info.mode = 0o644
    return info, data if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else None


def write_archive(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    """A tar.gz built by hand, member by member, so any hostile shape can be made."""
    with gzip.open(path, "wb") as gz, tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def bundle_members(bundle_dir: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    """The members a correct bundle tarball has, in order, read from an unpacked bundle directory."""
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    out = [member("manifest.json", (bundle_dir / "manifest.json").read_bytes())]
    out += [member(f["path"], (bundle_dir / f["path"]).read_bytes()) for f in manifest["files"]]
    return out


def model_file(manifest: dict) -> str:
    return next(f["path"] for f in manifest["files"] if f["path"].endswith("/model.onnx"))
