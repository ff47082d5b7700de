"""`lmpack pack` and `lmpack sign`: variant directories in, one deterministic bundle out.

Pack copies the variants into a staging bundle directory, digesting each file as it is copied (so the
manifest describes the copy, even if a source file changes meanwhile), writes manifest.json, then
streams that directory into a tarball whose bytes depend only on the input: two packs of the same
variants are identical, which lets anyone check a bundle by rebuilding it.

Build-side, but it needs nothing beyond lmpack.bundle: it reads variant.json and report.json as data.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lmpack import __version__
from lmpack.bundle.archive import HashingReader, create_in, write_tarball
from lmpack.bundle import wheels as wheelhouse
from lmpack.bundle.manifest import (MANIFEST, SIGNATURE, VARIANTS_DIR, Compatibility, FileEntry, GpuRequirement,
                                    Manifest, VariantEntry, Wheelhouse, check_name, check_relative_path, parse_version)
from lmpack.bundle.sbom import SBOM_NAME, make_sbom
from lmpack.bundle.signing import sign_manifest
from lmpack.bundle.verify import DirBundle, check_bundle, open_bundle, raise_problems
from lmpack.errors import BundleError, NotFoundError
from lmpack.fsio import file_sha256, guard_disk_full, publish, remove_path

VARIANT_FILE = "variant.json"  # the variant directory layout written by lmpack.api.build (docs/build.md)
REPORT_FILE = "report.json"
MODEL_DIR = "model"
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")  # TensorRT engines: tied to the GPU they were built on
INSTALL_SCRIPT = "install.py"  # stdlib-only first installer at the bundle's top level (lmpack/bundle/bootstrap.py)
_MIB = 1 << 20
_CHUNK = 1 << 20


@dataclass(frozen=True)
class PackResult:
    path: Path
    directory: Path | None
    name: str
    version: str
    files: int
    bytes: int
    archive_bytes: int
    archive_sha256: str
    variants: list[str]
    seconds: float
    wheelhouse: dict[str, Any] | None = None


@dataclass(frozen=True)
class WheelOptions:
    """Ship the runtime wheelhouse; `source` is a local wheel directory to resolve from offline (tests, mirrors)."""

    source: Path | None = None


@dataclass(frozen=True)
class _Variant:
    name: str
    root: Path
    meta: dict[str, Any]
    report: dict[str, Any]
    files: list[Path]


def pack(variant_dirs: list[Path], output: Path, *, name: str, version: str,
         keep_dir: Path | None = None, wheels: WheelOptions | None = None) -> PackResult:
    """Write the bundle tarball `output` (and the unpacked bundle directory `keep_dir`, if given).

    With `wheels`, the bundle also carries the runtime wheelhouse, its lock, install.py and an SBOM, so a
    host with nothing but Python 3 can install it.
    """
    started = time.perf_counter()
    check_name(name, what="--name")
    parse_version(version, what="--version")
    variants = sorted((_read_variant(Path(d)) for d in variant_dirs), key=lambda v: v.name)
    if not variants:
        raise BundleError("pack needs at least one variant directory")
    if len({v.name.casefold() for v in variants}) != len(variants):
        raise BundleError("two variant directories have the same name; rename one (lmpack build --name)")
    output = Path(output)
    manifest_holder: list[Manifest] = []

    def build_dir(staging: Path) -> None:
        manifest_holder.append(_stage(staging, variants, name=name, version=version, wheels=wheels))

    directory = Path(keep_dir) if keep_dir is not None else output.parent / f".{output.name}.bundle-{uuid.uuid4().hex[:8]}"
    try:
        if keep_dir is not None:
            publish(directory, build_dir)
        else:
            output.parent.mkdir(parents=True, exist_ok=True)
            with guard_disk_full(directory):
                build_dir(directory)
        with DirBundle(directory) as bundle:
            publish(output, lambda staging: write_tarball(staging, bundle.manifest_bytes, None, bundle.contents()))
    finally:
        if keep_dir is None:
            remove_path(directory)
    manifest = manifest_holder[0]
    return PackResult(path=output, directory=Path(keep_dir) if keep_dir is not None else None, name=name,
                      version=version, files=manifest.total_files, bytes=manifest.total_bytes,
                      archive_bytes=output.stat().st_size, archive_sha256=file_sha256(output),
                      variants=[v.name for v in variants], seconds=round(time.perf_counter() - started, 3),
                      wheelhouse=manifest.wheelhouse.to_dict() if manifest.wheelhouse else None)


def _read_variant(root: Path) -> _Variant:
    """A variant directory as lmpack build writes it; links and special files are refused, not followed."""
    if not root.is_dir():
        raise NotFoundError(f"variant directory {root} does not exist")
    name = check_name(root.resolve().name, what=f"variant directory {root}")
    for required in (VARIANT_FILE, REPORT_FILE, MODEL_DIR):
        if not (root / required).exists():
            raise BundleError(f"{root} is not a variant directory: {required} is missing",
                              hint="pack the directories that lmpack build writes (dist/MODEL-TARGET-PROFILE)")
    files: list[Path] = []
    for path in sorted(root.rglob("*")):
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise BundleError(f"{path} is a link or a special file; a bundle holds regular files only")
        if path.is_file():
            files.append(path)
    return _Variant(name=name, root=root, meta=_load_json(root / VARIANT_FILE), report=_load_json(root / REPORT_FILE),
                    files=files)


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} cannot be read as JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{path} must hold a JSON object")
    return data


def _need(data: dict[str, Any], key: str, where: Path) -> Any:
    if data.get(key) is None:
        raise BundleError(f"{where} lacks the field {key!r}; was it written by lmpack build?")
    return data[key]


def _stage(staging: Path, variants: list[_Variant], *, name: str, version: str,
           wheels: WheelOptions | None) -> Manifest:
    staging.mkdir(parents=True)
    entries: list[FileEntry] = []
    for variant in variants:
        for source in variant.files:
            relative = f"{VARIANTS_DIR}/{variant.name}/{source.relative_to(variant.root).as_posix()}"
            entries.append(_copy_digesting(source, staging, check_relative_path(relative, what=str(source))))
    built_at = _built_at(variants)
    house = None if wheels is None else _stage_wheels(staging, variants, entries, wheels, name=name,
                                                      version=version, built_at=built_at)
    entries.sort(key=lambda e: e.path)
    manifest = Manifest(name=name, version=version, built_at=built_at, lmpack_version=__version__,
                        variants=tuple(_variant_entry(v) for v in variants), files=tuple(entries), wheelhouse=house)
    (staging / MANIFEST).write_bytes(manifest.to_bytes())
    return manifest


def _target_facts(variants: list[_Variant]) -> tuple[str, str]:
    """The one (platform tag, Python) that every variant's target agrees on: a wheelhouse serves one host kind."""
    facts = {(str(_need(v.meta["target"], "platform_tag", v.root / VARIANT_FILE)),
              str(_need(v.meta["target"], "python", v.root / VARIANT_FILE))) for v in variants}
    if len(facts) != 1:
        raise BundleError(f"the variants target different platforms or Pythons {sorted(facts)}; one bundle ships "
                          "one wheelhouse", hint="pack variants for each platform into their own bundle")
    return facts.pop()


def _stage_wheels(staging: Path, variants: list[_Variant], entries: list[FileEntry], options: WheelOptions, *,
                  name: str, version: str, built_at: str) -> Wheelhouse:
    """Add wheels/, the lock, install.py and the SBOM to the staging bundle (entries grows in place)."""
    platform_tag, python = _target_facts(variants)
    model_entries = list(entries)
    with tempfile.TemporaryDirectory(prefix="lmpack-wheels-", dir=staging.parent) as scratch:
        runtime = wheelhouse.runtime_set([v.meta["target"] for v in variants])
        wheels = wheelhouse.build_wheelhouse(Path(scratch), platform_tag=platform_tag, python=python,
                                             source=options.source, runtime=runtime)
        for wheel in wheels:
            entries.append(_copy_digesting(Path(scratch) / wheel.filename, staging,
                                           f"{wheelhouse.WHEELS_DIR}/{wheel.filename}"))
    entries.append(_write_digesting(staging, wheelhouse.LOCK_PATH, wheelhouse.lock_text(wheels).encode("ascii")))
    script = (Path(__file__).parent / "bootstrap.py").read_bytes()
    entries.append(_write_digesting(staging, INSTALL_SCRIPT, script, mode=0o755))
    sbom = make_sbom(name=name, version=version, built_at=built_at, wheels=wheels, model_files=model_entries)
    entries.append(_write_digesting(staging, SBOM_NAME, sbom))
    return Wheelhouse(platform_tag=platform_tag, python=python, lock=wheelhouse.LOCK_PATH, wheels=len(wheels),
                      bytes=sum(w.size for w in wheels))


def _write_digesting(staging: Path, relative: str, data: bytes, *, mode: int = 0o644) -> FileEntry:
    entry = FileEntry(path=relative, size=len(data), mode=mode, sha256=hashlib.sha256(data).hexdigest())
    with open(create_in(staging, entry), "wb") as out:
        out.write(data)
        os.fchmod(out.fileno(), mode)
    return entry


def _copy_digesting(source: Path, staging: Path, relative: str) -> FileEntry:
    """Copy one file into the staging bundle and describe the copy: size, normalised mode, sha256."""
    stat = source.stat()
    mode = 0o755 if stat.st_mode & 0o111 else 0o644
    fd = create_in(staging, FileEntry(path=relative, size=stat.st_size, mode=mode, sha256="0" * 64))
    with open(source, "rb") as src, open(fd, "wb") as out:
        reader = HashingReader(src)
        shutil.copyfileobj(reader, out, _CHUNK)
        os.fchmod(out.fileno(), mode)
    return FileEntry(path=relative, size=reader.count, mode=mode, sha256=reader.sha256.hexdigest())


def _built_at(variants: list[_Variant]) -> str:
    """SOURCE_DATE_EPOCH if set, else the newest build among the variants: never the clock, so packs repeat."""
    if epoch := os.environ.get("SOURCE_DATE_EPOCH"):
        try:
            return datetime.fromtimestamp(int(epoch), timezone.utc).isoformat(timespec="seconds")
        except ValueError as exc:
            raise BundleError(f"SOURCE_DATE_EPOCH={epoch!r} is not a number of seconds") from exc
    times = [datetime.fromisoformat(str(_need(v.report, "built_at", v.root / REPORT_FILE))) for v in variants]
    return max(times).astimezone(timezone.utc).isoformat(timespec="seconds")


def memory_floor(model_bytes: int) -> int:
    """Weights plus half again for activations and the KV cache, plus 256 MiB for the runtime, in whole MiB.

    A floor for refusing hopeless hosts, not a sizing guide.
    """
    need = model_bytes * 3 // 2 + 256 * _MIB
    return -(-need // _MIB) * _MIB


def variant_entry(root: Path) -> VariantEntry:
    """The manifest entry (compatibility rule included) that packing the variant directory `root` would write."""
    return _variant_entry(_read_variant(Path(root)))


def _variant_entry(variant: _Variant) -> VariantEntry:
    where = variant.root / VARIANT_FILE
    target = _need(variant.meta, "target", where)
    cpu = _need(target, "cpu", where)
    model_files = [p for p in variant.files if p.relative_to(variant.root).parts[0] == MODEL_DIR]
    floor = memory_floor(sum(p.stat().st_size for p in model_files))
    gpu = None
    if target.get("gpu"):
        facts, tensorrt = target["gpu"], target.get("tensorrt") or {}
        engines = any(p.name.endswith(ENGINE_SUFFIXES) for p in model_files)
        portable = tensorrt.get("hardware_compatibility") == "ampere_plus"
        gpu = GpuRequirement(vendor=_need(facts, "vendor", where),
                             compute_capability="8.0" if engines and portable else _need(facts, "compute_capability", where),
                             match="exact" if engines and not portable else "minimum", min_memory_bytes=floor)
    source = _need(variant.report, "source", variant.root / REPORT_FILE)
    provenance = {key: (None if source.get(key) is None else str(source[key]))
                  for key in ("kind", "ref", "commit", "license", "sha256")}
    provenance["kind"] = str(_need(source, "kind", variant.root / REPORT_FILE))
    return VariantEntry(name=variant.name, target=_need(target, "name", where),
                        profile=_need(variant.meta, "profile", where), precision=_need(variant.meta, "precision", where),
                        task=variant.meta.get("task"),
                        execution_providers=tuple(_need(variant.meta, "execution_providers", where)),
                        compatibility=Compatibility(cpu_arch=_need(cpu, "arch", where), cpu_isa=tuple(cpu.get("isa", [])),
                                                    min_memory_bytes=floor, gpu=gpu),
                        provenance=provenance)


@dataclass(frozen=True)
class SignResult:
    path: Path
    name: str
    version: str
    key_id: str


def sign_bundle(path: Path, private_key: Path) -> SignResult:
    """Sign a bundle in place, after checking every file: a signature must never vouch for damaged contents."""
    path = Path(path)
    with open_bundle(path) as bundle:
        signature = sign_manifest(bundle.manifest_bytes, private_key)
        if isinstance(bundle, DirBundle):
            check_bundle(bundle, None)
            publish(path / SIGNATURE, lambda staging: staging.write_bytes(signature))
        else:  # rewrite the tarball with manifest.sig as member 1; contents are re-digested on the way
            raise_problems(bundle.check_structure(), bundle)
            publish(path, lambda staging: write_tarball(staging, bundle.manifest_bytes, signature, bundle.contents()))
        manifest = bundle.manifest
    return SignResult(path=path, name=manifest.name, version=manifest.version,
                      key_id=json.loads(signature)["key_id"])
