"""Hostile archives built by hand: each is rejected before anything is extracted anywhere."""

from __future__ import annotations

import gzip
import json
import tarfile
from pathlib import Path

import pytest
from bundle_helpers import bundle_members, member, run_cli, snapshot, write_archive

from lmpack.bundle.archive import TarBundle
from lmpack.bundle.verify import check_contents
from lmpack.errors import BundleError


def _listed(bundle_dir: Path) -> list[str]:
    return [f["path"] for f in json.loads((bundle_dir / "manifest.json").read_text())["files"]]


def _hostile(bundle_dir: Path, kind: str) -> list:
    """A correct bundle's members with one hostile change."""
    members = bundle_members(bundle_dir)
    first = _listed(bundle_dir)[0]
    variant_dir = first.rsplit("/", 2)[0]
    payload = b"owned"
    if kind == "dotdot":
        members.insert(1, member("../../evil", payload))
    elif kind == "dotdot-inside":
        members.insert(1, member(f"{variant_dir}/../../../evil", payload))
    elif kind == "absolute":
        members.insert(1, member(str(bundle_dir.parent / "evil-abs"), payload))
    elif kind == "backslash":
        members.insert(1, member("variants\\..\\..\\evil", payload))
    elif kind == "symlink":
        members.insert(1, member(f"{variant_dir}/link", kind=tarfile.SYMTYPE, linkname="/etc/passwd"))
    elif kind == "symlink-listed":  # a link planted under a listed name, then data written through it
        members[1] = member(first, kind=tarfile.SYMTYPE, linkname="/tmp")
    elif kind == "hardlink":
        members.insert(1, member(f"{variant_dir}/hard", kind=tarfile.LNKTYPE, linkname="/etc/passwd"))
    elif kind == "chardev":
        info, _ = member(f"{variant_dir}/null", kind=tarfile.CHRTYPE)
        info.devmajor, info.devminor = 1, 3
        members.insert(1, (info, None))
    elif kind == "fifo":
        members.insert(1, member(f"{variant_dir}/fifo", kind=tarfile.FIFOTYPE))
    elif kind == "directory":
        members.insert(1, member(f"{variant_dir}/dir", kind=tarfile.DIRTYPE))
    elif kind == "duplicate":
        members.append(members[1])
    elif kind == "case-collision":
        members.append(member(first.upper(), payload))
    elif kind == "manifest-not-first":
        members.append(members.pop(0))
    elif kind == "second-manifest":
        members.append(member("manifest.json", members[0][1]))
    elif kind == "unlisted":
        members.append(member(f"{variant_dir}/unlisted", payload))
    elif kind == "larger":
        info, data = members[1]
        members[1] = member(info.name, data + b"more bytes than the manifest says")
    elif kind == "bomb":  # 64 MiB of zeros under a listed name: far past the declared totals, ~64 KiB compressed
        info, _ = members[1]
        members[1] = member(info.name, bytes(64 << 20))
    elif kind == "pax-sparse":  # a listed file's data declared as a map of holes (GNU sparse 0.1 in PAX headers)
        info, data = members[1]
        info.pax_headers = {"GNU.sparse.size": str(len(data)), "GNU.sparse.map": f"0,{len(data)}"}
    elif kind == "pax-sparse-malformed":  # sparse 1.0, whose map (at the start of the data) does not parse
        info, data = members[1]
        info.pax_headers = {
            "GNU.sparse.major": "1",
            "GNU.sparse.minor": "0",
            "GNU.sparse.name": info.name,
            "GNU.sparse.realsize": str(len(data)),
        }
    return members


KINDS = [
    "dotdot",
    "dotdot-inside",
    "absolute",
    "backslash",
    "symlink",
    "symlink-listed",
    "hardlink",
    "chardev",
    "fifo",
    "directory",
    "duplicate",
    "case-collision",
    "manifest-not-first",
    "second-manifest",
    "unlisted",
    "larger",
    "bomb",
    "pax-sparse",
    "pax-sparse-malformed",
]


@pytest.mark.parametrize("kind", KINDS)
def test_hostile_member_is_rejected_before_extracting(bundles, tmp_path, kind):
    work = tmp_path / "work"
    work.mkdir()
    archive = write_archive(work / "hostile.lmpack", _hostile(bundles["1.0.0-dir"], kind))
    prefix = tmp_path / "prefix"
    assert run_cli("install", bundles["1.0.0"], "--prefix", prefix).exit_code == 0
    before_prefix, before_work = snapshot(prefix), snapshot(tmp_path)
    for command in (["verify", archive], ["install", archive, "--prefix", prefix, "--allow-downgrade"]):
        result = run_cli(*command)
        assert result.exit_code in (12, 13), (kind, result.output)
        assert "internal error" not in result.output
    assert snapshot(prefix) == before_prefix
    assert snapshot(tmp_path) == before_work  # nothing written beside it either
    assert not (tmp_path.parent / "evil").exists() and not (bundles["1.0.0-dir"].parent / "evil-abs").exists()


def test_structure_pass_reads_no_data_and_bomb_stops_at_its_header(bundles, tmp_path):
    archive = write_archive(tmp_path / "bomb.lmpack", _hostile(bundles["1.0.0-dir"], "bomb"))
    assert archive.stat().st_size < 2 << 20
    with TarBundle(archive) as bundle, pytest.raises(BundleError, match="totals"):
        bundle.check_structure()


def test_extraction_never_leaves_the_staging_directory(bundles, tmp_path):
    """Even if a bad name got past the header checks, create_in would refuse it on resolved paths."""
    from lmpack.bundle.archive import create_in
    from lmpack.bundle.manifest import FileEntry

    staging = tmp_path / "dest"
    staging.mkdir()
    (tmp_path / "dest-evil").mkdir()
    (staging / "sub").symlink_to(tmp_path / "dest-evil")  # /x/dest-evil starts with /x/dest as a string
    with pytest.raises(BundleError, match="outside"):
        create_in(staging, FileEntry(path="sub/file", size=1, mode=0o644, sha256="0" * 64))
    assert not list((tmp_path / "dest-evil").iterdir())


def test_truncated_and_garbage_archives(bundles, tmp_path):
    raw = bundles["1.0.0"].read_bytes()
    cut = tmp_path / "cut.lmpack"
    cut.write_bytes(raw[: len(raw) // 2])
    garbage = tmp_path / "garbage.lmpack"
    garbage.write_bytes(b"this is not a bundle" * 100)
    empty = tmp_path / "empty.lmpack"
    with gzip.open(empty, "wb") as gz, tarfile.open(fileobj=gz, mode="w"):
        pass
    for path in (cut, garbage, empty):
        result = run_cli("verify", path)
        assert result.exit_code == 12, (path.name, result.output)
        assert "internal error" not in result.output
    assert run_cli("install", garbage, "--prefix", tmp_path / "new-prefix").exit_code == 12
    assert not (tmp_path / "new-prefix").exists()  # an unreadable bundle creates nothing


def test_two_passes_see_the_same_archive(bundles, tmp_path):
    """The archive is read through one open file: replacing the path between passes changes nothing."""
    copy = tmp_path / "b.lmpack"
    copy.write_bytes(bundles["1.0.0"].read_bytes())
    with TarBundle(copy) as bundle:
        assert bundle.check_structure() == []
        copy.unlink()
        copy.write_bytes(b"swapped")
        assert check_contents(bundle) == []


@pytest.mark.parametrize("damage", ["gzip trailer cut off", "data after the gzip stream", "a second gzip member"])
def test_the_gzip_stream_must_be_whole_and_alone(bundles, tmp_path, damage):
    """The tar walk ends at the archive's end marker, before the gzip trailer: verify and install read the
    compressed stream to its end too (its CRC and size), and nothing may follow it."""
    raw = bundles["1.0.0"].read_bytes()
    damaged = {
        "gzip trailer cut off": raw[:-8],
        "data after the gzip stream": raw + b"appended bytes",
        "a second gzip member": raw + gzip.compress(b"more"),
    }[damage]
    path = tmp_path / "damaged.lmpack"
    path.write_bytes(damaged)
    for command in (["verify", path], ["install", path, "--prefix", tmp_path / "prefix"]):
        result = run_cli(*command)
        assert result.exit_code == 12, (damage, result.output)
        assert "internal error" not in result.output
    assert not (tmp_path / "prefix" / "releases").exists()
