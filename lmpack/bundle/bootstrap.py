#!/usr/bin/env python3
"""install.py: the first install of a bundle on a host that has nothing but Python 3.

Copied to the top of every bundle packed with --wheels. Standard library only. It:

1. checks every file's size and sha256 against manifest.json, so the code it is about to import is
   the code the manifest (and its signature) describes;
2. imports lmpack straight from the bundled, pure-Python lmpack wheel (a zip on sys.path) and calls
   the same install that `lmpack install` runs: the signature is checked there (pure-Python Ed25519
   when `cryptography` is not installed yet, see lmpack/bundle/ed25519.py), the release is laid out,
   RELEASE/venv is created from the bundled wheels, and `current` switches atomically.

So the first install and every later `lmpack install` share one implementation and one policy.
A caveat that no script can remove: install.py travels inside the bundle it checks, so a forged bundle
can carry a forged install.py. Check the tarball's sha256 or signature out of band before the first
run; later installs run the installed lmpack, which does not depend on the bundle's own code.

    tar xzf smollm2.lmpack -C smollm2 && python3 smollm2/install.py --prefix /opt/lmpack
"""

import argparse
import hashlib
import json
import os
import stat
import sys
from typing import NoReturn

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_MANIFEST_BYTES = 64 << 20  # as lmpack.bundle.manifest: this file runs before lmpack is importable


def _fail(message: str, code: int) -> NoReturn:
    sys.stderr.write(f"error: {message}\n")
    sys.exit(code)


def check_files(root: str) -> dict:
    """Every listed file's size and sha256; exit 13 (as lmpack verify would) on the first difference.

    Before a byte is read, every listed path must be a regular file reached through real directories: a
    symlink (to /dev/zero, say), a device or a FIFO would block a read forever, and lmpack install refuses
    them with the same words."""
    try:
        with open(os.path.join(root, "manifest.json"), "rb") as handle:
            manifest = json.loads(handle.read(MAX_MANIFEST_BYTES + 1).decode("utf-8"))
        files = [(entry["path"], entry["size"], entry["sha256"]) for entry in manifest["files"]]
    except (OSError, ValueError, RecursionError, KeyError, TypeError) as exc:
        _fail(f"manifest.json cannot be read: {type(exc).__name__}: {exc}", 12)
    for path, _, _ in files:
        if not isinstance(path, str) or path.startswith("/") or ".." in path.split("/") or "\\" in path:
            _fail(f"manifest.json lists an unsafe path {path!r}", 12)
        _check_regular(root, path)
    for path, want_size, want_sha in files:
        digest, size = hashlib.sha256(), 0
        try:
            with open(os.path.join(root, path), "rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
                    size += len(chunk)
        except OSError as exc:
            _fail(f"{path}: {exc.strerror}", 13)
        if size != want_size or digest.hexdigest() != want_sha:
            _fail(f"{path}: does not match manifest.json (altered or truncated copy)", 13)
    return manifest


def _check_regular(root: str, path: str) -> None:
    """Each part of `path` a real directory and the last a regular file with one name, by lstat (nothing opened)."""
    parts = path.split("/")
    for depth in range(1, len(parts) + 1):
        current = os.path.join(root, *parts[:depth])
        try:
            info = os.lstat(current)
        except OSError as exc:
            _fail(f"{path}: {exc.strerror}", 13)
        if stat.S_ISLNK(info.st_mode):
            _fail(f"{'/'.join(parts[:depth])}: a symlink; bundles hold regular files only", 13)
        last = depth == len(parts)
        if last and not stat.S_ISREG(info.st_mode) or not last and not stat.S_ISDIR(info.st_mode):
            _fail(f"{'/'.join(parts[:depth])}: not a regular file", 13)
        if last and info.st_nlink > 1:
            _fail(f"{path}: a hard link; bundles hold regular files only", 13)


def main() -> None:
    parser = argparse.ArgumentParser(description="Install this lmpack bundle (first install, standard library only).")
    parser.add_argument("--prefix", required=True, help="install root, e.g. /opt/lmpack")
    parser.add_argument("--public-key", help="require a valid manifest.sig made with this Ed25519 public key")
    parser.add_argument("--allow-downgrade", action="store_true")
    parser.add_argument("--systemd-dir", help="also write lmpack-serve@.service into this directory")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument(
        "--archive",
        help="install from this .lmpack tarball (the one unpacked here), with every check of the archive itself: "
        "member order, signature place, sparse members, the whole gzip stream",
    )
    args = parser.parse_args()
    if sys.version_info < (3, 10):  # noqa: UP036 - any host python3 runs this file, lmpack needs 3.10
        _fail("lmpack needs Python 3.10 or later", 3)
    manifest = check_files(HERE)
    wheels = [
        f["path"] for f in manifest["files"] if f["path"].startswith("wheels/lmpack-") and f["path"].endswith(".whl")
    ]
    if len(wheels) != 1:
        _fail("this bundle has no lmpack wheel; install it with an installed lmpack instead", 12)
    sys.path.insert(0, os.path.join(HERE, wheels[0]))
    from pathlib import Path

    from lmpack.bundle.install import InstallOptions, install
    from lmpack.errors import LmpackError

    options = InstallOptions(
        public_keys=(Path(args.public_key),) if args.public_key else (),
        allow_downgrade=args.allow_downgrade,
        python=sys.executable,
        systemd_dir=Path(args.systemd_dir) if args.systemd_dir else None,
    )
    source = Path(HERE)
    try:
        if args.archive:  # the unpacked copy ran the checks above and provides lmpack; the archive is what installs
            from lmpack.bundle.verify import open_bundle

            with open_bundle(Path(args.archive)) as archive:
                if archive.manifest_bytes != (source / "manifest.json").read_bytes():
                    _fail(f"{args.archive} is not the bundle unpacked in {HERE} (their manifest.json differ)", 12)
            source = Path(args.archive)
        result = install(source, Path(args.prefix), options=options, on_phase=_phase_printer(args.quiet))
    except LmpackError as exc:
        _fail(exc.message + (f"\nhint: {exc.hint}" if exc.hint else ""), exc.exit_code)
    print(f"{result.action} {result.name} {result.version}, signature {result.signature}, in {result.seconds:.1f} s")
    print(f"  {result.path}\n  run: {result.path.parent / 'current' / 'venv' / 'bin' / 'lmpack'} --help")


def _phase_printer(quiet: bool):
    if quiet:
        return lambda message: None
    return lambda message: print(f"install.py: {message} ...", file=sys.stderr, flush=True)


if __name__ == "__main__":
    os.umask(0o022)
    main()
