"""Packing real variants: a complete manifest and a tarball whose bytes depend only on the input."""

from __future__ import annotations

import json
import os
import shutil
import tarfile

import pytest
from bundle_helpers import pack_bundle, run_cli

from lmpack.bundle.manifest import parse_manifest
from lmpack.errors import BundleError


def test_two_packs_of_the_same_input_are_byte_identical(tiny_variant, second_variant, tmp_path):
    first = pack_bundle([tiny_variant, second_variant], tmp_path / "a.lmpack")
    copy = tmp_path / "copy" / tiny_variant.name
    shutil.copytree(tiny_variant, copy)  # new mtimes, inodes and directory order
    for path in copy.rglob("*"):
        os.utime(path, (1, 1))
    (copy / "report.txt").chmod(0o600)  # modes are normalised to 0644/0755
    second = pack_bundle([second_variant, copy], tmp_path / "b.lmpack")  # argument order does not matter
    assert first.read_bytes() == second.read_bytes()


def test_archive_headers_are_fixed(bundles):
    raw = bundles["1.0.0"].read_bytes()
    assert raw[:3] == b"\x1f\x8b\x08" and raw[3] == 0  # gzip, no FNAME/FCOMMENT/FEXTRA flags
    assert raw[4:8] == b"\0\0\0\0"  # gzip mtime 0
    with tarfile.open(bundles["1.0.0"], "r:gz") as tf:
        members = tf.getmembers()
    names = [m.name for m in members]
    assert names[0] == "manifest.json" and names[1:] == sorted(names[1:])
    assert all(
        m.isreg()
        and m.mtime == 0
        and m.uid == 0
        and m.gid == 0
        and m.uname == ""
        and m.gname == ""
        and m.mode in (0o644, 0o755)
        for m in members
    )
    with tarfile.open(bundles["1.0.0-signed"], "r:gz") as tf:
        assert tf.getnames()[:2] == ["manifest.json", "manifest.sig"]


def test_manifest_describes_variants_provenance_and_every_file(bundles, tiny_variant):
    directory = bundles["1.0.0-dir"]
    manifest = parse_manifest((directory / "manifest.json").read_bytes())
    assert (manifest.name, manifest.version) == ("tiny", "1.0.0")
    report = json.loads((tiny_variant / "report.json").read_text())
    assert manifest.built_at == report["built_at"]  # from the input, never the clock
    variant = manifest.variants[0]
    assert variant.name == tiny_variant.name and variant.target == "cpu-x86" and variant.precision == "int8"
    assert variant.execution_providers == ("CPUExecutionProvider",)
    rule = variant.compatibility
    assert rule.cpu_arch == "x86_64" and "avx2" in rule.cpu_isa and rule.gpu is None
    assert rule.min_memory_bytes >= 256 << 20
    assert variant.provenance["kind"] == "directory" and variant.provenance["license"] == "apache-2.0"
    on_disk = sorted(p.relative_to(tiny_variant).as_posix() for p in tiny_variant.rglob("*") if p.is_file())
    assert [f.path for f in manifest.files] == [f"variants/{tiny_variant.name}/{p}" for p in on_disk]
    assert manifest.total_bytes == sum((tiny_variant / p).stat().st_size for p in on_disk)


def test_pack_cli_json_and_refusals(tiny_variant, tmp_path):
    result = run_cli(
        "pack", tiny_variant, "-o", tmp_path / "t.lmpack", "--name", "tiny", "--version", "2.0.0", "--json"
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["files"] > 5 and len(out["archive_sha256"]) == 64
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
    for args in (["--name", "../x", "--version", "1.0.0"], ["--name", "t", "--version", "1.0"]):
        result = run_cli("pack", tiny_variant, "-o", tmp_path / "bad.lmpack", *args)
        assert result.exit_code == 12, result.output
    result = run_cli("pack", tmp_path / "missing", "-o", tmp_path / "bad.lmpack", "--name", "t", "--version", "1.0.0")
    assert result.exit_code == 4
    assert not (tmp_path / "bad.lmpack").exists()


def test_links_in_a_variant_are_refused(tiny_variant, tmp_path):
    copy = tmp_path / tiny_variant.name
    shutil.copytree(tiny_variant, copy)
    (copy / "model" / "passwd").symlink_to("/etc/passwd")
    with pytest.raises(BundleError, match="link"):
        pack_bundle([copy], tmp_path / "x.lmpack")


def test_pack_sign_and_install_say_each_phase_and_quiet_silences_them(tiny_variant, tmp_path):
    """A line per phase on stderr (stdout keeps the result), none with --quiet; sign prints the tarball's new
    sha256, which is the file's (the one pack printed no longer is)."""
    import hashlib

    from click.testing import CliRunner

    from lmpack.bundle import signing
    from lmpack.cli.main import cli

    def run(*args: str):
        result = CliRunner().invoke(cli, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result

    bundle = tmp_path / "tiny-1.0.0.lmpack"
    packed = run("pack", tiny_variant, "-o", bundle, "--name", "tiny", "--version", "1.0.0")
    assert "pack: copying and hashing 1 variant(s)" in packed.stderr and f"pack: writing {bundle}" in packed.stderr
    assert "pack:" not in packed.stdout
    packed_sha = packed.stdout.split("sha256 ")[1].split()[0]
    key, _, _ = signing.keygen(tmp_path / "keys" / "release")
    signed = run("sign", bundle, "--key", key)
    new_sha = hashlib.sha256(bundle.read_bytes()).hexdigest()
    assert f"sha256 {new_sha}" in signed.stdout and new_sha != packed_sha
    assert "sign: checking and rewriting" in signed.stderr
    installed = run("install", bundle, "--prefix", tmp_path / "prefix")
    assert "install: checking and extracting" in installed.stderr and "install: pointing current at 1.0.0" in (
        installed.stderr
    )
    quiet = run("install", bundle, "--prefix", tmp_path / "prefix2", "--quiet")
    assert quiet.stderr == "" and "installed tiny 1.0.0" in quiet.stdout
