"""Tampering: each kind is rejected by verify and by install, naming the file, leaving the prefix unchanged."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
from bundle_helpers import member, model_file, run_cli, snapshot, write_archive


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _manifest(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())


def _tamper_model_byte(d: Path) -> str:
    name = model_file(_manifest(d))
    _flip(d / name, (d / name).stat().st_size // 2)
    return name


def _tamper_manifest_digest(d: Path) -> str:
    name = model_file(_manifest(d))
    text = (d / "manifest.json").read_text()
    entry = next(f for f in _manifest(d)["files"] if f["path"] == name)
    digest = entry["sha256"]
    flipped = ("0" if digest[10] != "0" else "1").join([digest[:10], digest[11:]])
    (d / "manifest.json").write_text(text.replace(digest, flipped))
    return name


def _tamper_signature_byte(d: Path) -> str:
    sig = json.loads((d / "manifest.sig").read_text())
    raw = bytearray(base64.b64decode(sig["signature"]))
    raw[5] ^= 0x01
    sig["signature"] = base64.b64encode(bytes(raw)).decode()
    (d / "manifest.sig").write_text(json.dumps(sig))
    return "manifest.sig"


def _tamper_signature_raw(d: Path) -> str:
    _flip(d / "manifest.sig", 40)
    return "manifest.sig"


def _add_file(d: Path) -> str:
    variant = _manifest(d)["variants"][0]["path"]
    (d / variant / "model" / "extra.onnx").write_bytes(b"not listed")
    return f"{variant}/model/extra.onnx"


def _remove_file(d: Path) -> str:
    name = model_file(_manifest(d)).replace("model.onnx", "tokenizer.json")
    (d / name).unlink()
    return name


def _truncate_file(d: Path) -> str:
    name = model_file(_manifest(d))
    data = (d / name).read_bytes()
    (d / name).write_bytes(data[: len(data) // 3])
    return name


UNSIGNED = {
    "model-byte": _tamper_model_byte,
    "manifest-digest": _tamper_manifest_digest,
    "file-added": _add_file,
    "file-removed": _remove_file,
    "file-truncated": _truncate_file,
}
SIGNED = {
    "signature-byte": _tamper_signature_byte,
    "signature-file-byte": _tamper_signature_raw,
    "manifest-digest-signed": _tamper_manifest_digest,
}


def _as_tarball(directory: Path, out: Path) -> Path:
    """Tar a (tampered) directory the way a copy on the way would carry it: manifest first, then files."""
    members = [member("manifest.json", (directory / "manifest.json").read_bytes())]
    if (directory / "manifest.sig").exists():
        members.append(member("manifest.sig", (directory / "manifest.sig").read_bytes()))
    files = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    members += [member(f, (directory / f).read_bytes()) for f in files if f not in ("manifest.json", "manifest.sig")]
    return write_archive(out, members)


def _installed_prefix(bundles, tmp_path: Path) -> Path:
    prefix = tmp_path / "prefix"
    result = run_cli("install", bundles["1.0.0-signed"], "--prefix", prefix)
    assert result.exit_code == 0, result.output
    return prefix


def _check_rejected(bundle: Path, named: str, prefix: Path, *extra: str) -> None:
    before = snapshot(prefix)
    verify = run_cli("verify", bundle, "--json", *extra)
    assert verify.exit_code in (12, 13), verify.output
    error = json.loads(verify.stdout)["error"]
    assert named in error["message"] or any(named in p for p in error.get("problems", [])), error
    install = run_cli("install", bundle, "--prefix", prefix, *extra)
    assert install.exit_code in (12, 13), install.output
    assert named in install.stderr
    assert snapshot(prefix) == before


@pytest.mark.parametrize("form", ["dir", "tar"])
@pytest.mark.parametrize("kind", sorted(UNSIGNED))
def test_tampering_is_rejected(bundles, tmp_path, kind, form):
    prefix = _installed_prefix(bundles, tmp_path)
    work = tmp_path / "tiny-1.1.0"
    shutil.copytree(bundles["1.1.0-dir"], work)
    named = UNSIGNED[kind](work)
    bundle = work if form == "dir" else _as_tarball(work, tmp_path / "tampered.lmpack")
    _check_rejected(bundle, named, prefix)


@pytest.mark.parametrize("form", ["dir", "tar"])
@pytest.mark.parametrize("kind", sorted(SIGNED))
def test_signature_tampering_is_rejected(bundles, tmp_path, kind, form):
    prefix = _installed_prefix(bundles, tmp_path)
    work = tmp_path / "tiny-1.1.0"
    shutil.copytree(bundles["1.1.0-signed-dir"], work)
    SIGNED[kind](work)
    bundle = work if form == "dir" else _as_tarball(work, tmp_path / "tampered.lmpack")
    _check_rejected(bundle, "manifest.sig", prefix, "--public-key", bundles["pub"])


@pytest.mark.parametrize("form", ["dir", "tar"])
def test_signature_from_another_bundle_or_key_is_rejected(bundles, tmp_path, form):
    prefix = _installed_prefix(bundles, tmp_path)
    work = tmp_path / "tiny-1.1.0"
    shutil.copytree(bundles["1.1.0-signed-dir"], work)
    shutil.copy(bundles["1.0.0-signed-dir"] / "manifest.sig", work / "manifest.sig")  # valid, for another manifest
    bundle = work if form == "dir" else _as_tarball(work, tmp_path / "swapped.lmpack")
    _check_rejected(bundle, "manifest.sig", prefix, "--public-key", bundles["pub"])
    genuine = bundles["1.1.0-signed"] if form == "tar" else bundles["1.1.0-signed-dir"]
    _check_rejected(genuine, "another key", prefix, "--public-key", bundles["other-pub"])


def test_unsigned_bundle_with_a_key_and_a_downgrade_are_refused(bundles, tmp_path):
    prefix = _installed_prefix(bundles, tmp_path)
    before = snapshot(prefix)
    result = run_cli("install", bundles["1.1.0"], "--prefix", prefix, "--public-key", bundles["pub"])
    assert result.exit_code == 13 and "manifest.sig" in result.stderr
    assert snapshot(prefix) == before
    assert (
        run_cli("install", bundles["1.1.0-signed"], "--prefix", prefix, "--public-key", bundles["pub"]).exit_code == 0
    )
    before = snapshot(prefix)
    result = run_cli("install", bundles["1.0.0-signed"], "--prefix", prefix, "--json")
    assert result.exit_code == 14 and "downgrade" in json.loads(result.stdout)["error"]["message"]
    assert snapshot(prefix) == before


def test_good_bundles_verify_in_every_form(bundles):
    for key in ("1.0.0", "1.0.0-dir", "1.0.0-signed", "1.0.0-signed-dir"):
        result = run_cli(
            "verify", bundles[key], "--json", *(["--public-key", bundles["pub"]] if "signed" in key else [])
        )
        assert result.exit_code == 0, result.output
        out = json.loads(result.stdout)
        assert out["ok"] and out["signature"] == ("valid" if "signed" in key else "unsigned")
    assert json.loads(run_cli("verify", bundles["1.0.0-signed"], "--json").stdout)["signature"] == "not checked"


def test_verify_lists_every_problem_in_a_directory(bundles, tmp_path):
    work = tmp_path / "b"
    shutil.copytree(bundles["1.0.0-dir"], work)
    names = {_add_file(work), _remove_file(work), _truncate_file(work)}
    result = run_cli("verify", work, "--json")
    problems = json.loads(result.stdout)["error"]["problems"]
    assert result.exit_code == 13 and len(problems) == 3
    assert {p.split(":")[0] for p in problems} == names
