"""The one strict manifest parser: every name, digest, size and total is checked before a path is built."""

from __future__ import annotations

import copy
import json

import pytest

from lmpack.bundle.manifest import (
    Compatibility,
    FileEntry,
    Manifest,
    VariantEntry,
    check_relative_path,
    parse_manifest,
    parse_version,
)
from lmpack.errors import BundleError

DIGEST = "ab" * 32


def _manifest(*paths: str) -> Manifest:
    variant = VariantEntry(
        name="v",
        target="cpu-x86",
        profile="int8",
        precision="int8",
        task="text-generation",
        execution_providers=("CPUExecutionProvider",),
        compatibility=Compatibility(cpu_arch="x86_64", cpu_isa=("avx2",), min_memory_bytes=1 << 28),
        provenance={"kind": "local", "ref": "/m", "commit": None, "license": "mit", "sha256": None},
    )
    files = tuple(FileEntry(path=p, size=3, mode=0o644, sha256=DIGEST) for p in sorted(paths or ("variants/v/a",)))
    return Manifest(
        name="tiny",
        version="1.0.0",
        built_at="2025-01-01T00:00:00+00:00",
        lmpack_version="0.1.0",
        variants=(variant,),
        files=files,
    )


def _data() -> dict:
    return json.loads(_manifest("variants/v/model/model.onnx", "variants/v/variant.json").to_bytes())


def _parse(data: dict) -> Manifest:
    return parse_manifest(json.dumps(data).encode())


def test_round_trip_is_canonical():
    manifest = _manifest("variants/v/b", "variants/v/a/c")
    parsed = parse_manifest(manifest.to_bytes())
    assert parsed == manifest and parsed.to_bytes() == manifest.to_bytes()
    assert parsed.total_files == 2 and parsed.total_bytes == 6


@pytest.mark.parametrize(
    "path",
    [
        "",
        "/etc/passwd",
        "../x",
        "variants/../../x",
        "a//b",
        "a/./b",
        "a/",
        "a\\b",
        "C:\\x",
        "a\x00b",
        "a\nb",
        "a/" + "x" * 256,
        "x" * 1025,
    ],
)
def test_bad_paths_are_rejected(path):
    with pytest.raises(BundleError):
        check_relative_path(path, what="test")
    data = _data()
    data["files"][0]["path"] = path
    with pytest.raises(BundleError):
        _parse(data)


@pytest.mark.parametrize(
    "field,value",
    [
        ("sha256", "AB" * 32),
        ("sha256", "ab" * 31),
        ("sha256", "../" + "a" * 61),
        ("sha256", "ab" * 32 + "\n"),
        ("size", -1),
        ("size", 1 << 41),
        ("size", True),
        ("size", "3"),
        ("mode", "0777"),
        ("mode", 420),
    ],
)
def test_bad_file_fields_are_rejected(field, value):
    data = _data()
    data["files"][0][field] = value
    with pytest.raises(BundleError, match=field):
        _parse(data)


def test_duplicate_case_colliding_and_file_directory_clashes():
    for paths in (
        ("variants/v/a", "variants/v/A"),
        ("variants/v/a", "variants/v/a/b"),
        ("variants/v/\u00e9", "variants/v/e\u0301"),
    ):
        data = json.loads(_manifest().to_bytes())
        data["files"] = [{"path": p, "size": 3, "mode": "0644", "sha256": DIGEST} for p in sorted(paths)]
        data["totals"] = {"bytes": 6, "files": 2}
        with pytest.raises(BundleError):
            _parse(data)


def test_totals_must_add_up_and_files_must_be_sorted():
    data = _data()
    data["totals"]["bytes"] += 1
    with pytest.raises(BundleError, match="totals"):
        _parse(data)
    data = _data()
    data["files"].reverse()
    with pytest.raises(BundleError, match="sorted"):
        _parse(data)


def test_reserved_names_unknown_fields_duplicate_keys_and_schema():
    data = _data()
    data["files"][0]["path"] = "manifest.json"
    with pytest.raises(BundleError):
        _parse(data)
    data = _data()
    data["extra"] = 1
    with pytest.raises(BundleError, match="unknown field 'extra'"):
        _parse(data)
    raw = _manifest().to_bytes().replace(b'"name": "tiny"', b'"name": "tiny", "name": "evil"')
    with pytest.raises(BundleError, match="twice"):
        parse_manifest(raw)
    data = _data()
    data["schema_version"] = 3
    with pytest.raises(BundleError, match="newer lmpack|not supported"):
        _parse(data)
    with pytest.raises(BundleError, match="JSON"):
        parse_manifest(b"\xff{")


@pytest.mark.parametrize(
    "key,value",
    [
        ("name", "../evil"),
        ("name", ""),
        ("version", "1.0"),
        ("version", "v1.0.0"),
        ("version", "01.0.0"),
        ("version", "1.0.0-rc1"),
        ("built_at", "yesterday"),
        ("built_at", "2025-01-01T00:00:00"),
    ],
)
def test_bad_identity_fields(key, value):
    data = _data()
    data[key] = value
    with pytest.raises(BundleError):
        _parse(data)


def test_variant_must_own_files_and_provenance_must_match():
    data = _data()
    data["variants"][0]["path"] = "variants/other"
    with pytest.raises(BundleError):
        _parse(data)
    data = _data()
    data["provenance"][0]["license"] = "proprietary"
    with pytest.raises(BundleError, match="provenance"):
        _parse(data)
    data = copy.deepcopy(_data())
    data["variants"][0]["compatibility"]["cpu"]["arch"] = "riscv"
    with pytest.raises(BundleError, match="arch"):
        _parse(data)


def test_versions_compare_numerically():
    assert parse_version("1.10.0") > parse_version("1.9.9") > parse_version("1.9.0") > parse_version("0.99.99")
