"""The bundle manifest (docs/bundle-format.md): one strict parser and one canonical writer.

Everything a bundle says about itself, names and digests above all, goes through `parse_manifest`
before any path is built from it: a digest or a name used as a path unchecked is how archive tools
and model runners got arbitrary file writes. The parser rejects rather than repairs, and it is the
only place that knows the format, so a second, laxer reading cannot creep in elsewhere.

Runtime-side: standard library and lmpack.errors only.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from lmpack.bundle.jsonfields import Fields, no_constants, no_duplicate_keys
from lmpack.errors import BundleError

SCHEMA_VERSION = 2  # 2 adds `wheelhouse`; a bundle without wheels is still written as 1, so older readers take it
READABLE_SCHEMAS = (1, 2)
FORMAT = "lmpack-bundle"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
RESERVED = (MANIFEST, SIGNATURE)
VARIANTS_DIR = "variants"
RESERVED_DIRS = ("venv",)  # made by install inside a release, so never a listed path

MAX_MANIFEST_BYTES = 64 << 20
MAX_FILE_BYTES = 1 << 40  # 1 TiB: larger than any model file, small enough to stop a forged size early
MAX_TOTAL_BYTES = 1 << 42
MAX_FILES = 100_000
MAX_PATH_CHARS = 1024
MAX_PART_BYTES = 255
MODES = {"0644": 0o644, "0755": 0o755}

DIGEST_RE = re.compile(r"^[0-9a-f]{64}\Z")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
VERSION_RE = re.compile(r"^(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})\Z")
_WORD_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+:-]{0,127}\Z")
_PYTHON_RE = re.compile(r"^3\.[0-9]{1,2}\Z")
_ARCHES = ("x86_64", "aarch64")
_PROVENANCE_KEYS = ("kind", "ref", "commit", "license", "sha256")


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    mode: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "mode": f"{self.mode:04o}", "sha256": self.sha256}


@dataclass(frozen=True)
class GpuRequirement:
    """`match` is "minimum" (CUDA kernels run on later GPUs) or "exact" (TensorRT engines are tied to one)."""

    vendor: str
    compute_capability: str
    match: str
    min_memory_bytes: int


@dataclass(frozen=True)
class Compatibility:
    """What a host needs to run a variant: checked by the runtime to pick a variant, never by the wall clock."""

    cpu_arch: str
    cpu_isa: tuple[str, ...]
    min_memory_bytes: int
    gpu: GpuRequirement | None = None

    def to_dict(self) -> dict[str, Any]:
        gpu = (
            None
            if self.gpu is None
            else {
                "vendor": self.gpu.vendor,
                "compute_capability": self.gpu.compute_capability,
                "match": self.gpu.match,
                "min_memory_bytes": self.gpu.min_memory_bytes,
            }
        )
        return {
            "cpu": {"arch": self.cpu_arch, "isa": list(self.cpu_isa)},
            "gpu": gpu,
            "min_memory_bytes": self.min_memory_bytes,
        }


@dataclass(frozen=True)
class VariantEntry:
    name: str
    target: str
    profile: str
    precision: str
    task: str | None
    execution_providers: tuple[str, ...]
    compatibility: Compatibility
    provenance: dict[str, str | None]

    @property
    def path(self) -> str:
        return f"{VARIANTS_DIR}/{self.name}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "target": self.target,
            "profile": self.profile,
            "precision": self.precision,
            "task": self.task,
            "execution_providers": list(self.execution_providers),
            "compatibility": self.compatibility.to_dict(),
            "provenance": dict(self.provenance),
        }


@dataclass(frozen=True)
class Wheelhouse:
    """The runtime wheels: for which platform and Python they were resolved, where the lock is, how big."""

    platform_tag: str
    python: str
    lock: str
    wheels: int
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    built_at: str
    lmpack_version: str
    variants: tuple[VariantEntry, ...]
    files: tuple[FileEntry, ...]
    wheelhouse: Wheelhouse | None = None
    by_path: dict[str, FileEntry] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_path", {f.path: f for f in self.files})

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def total_files(self) -> int:
        return len(self.files)

    @property
    def provenance(self) -> list[dict[str, str | None]]:
        unique = {json.dumps(v.provenance, sort_keys=True): v.provenance for v in self.variants}
        return [unique[key] for key in sorted(unique)]

    @property
    def schema_version(self) -> int:
        return 1 if self.wheelhouse is None else SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        extra = {} if self.wheelhouse is None else {"wheelhouse": self.wheelhouse.to_dict()}
        return {
            **extra,
            "schema_version": self.schema_version,
            "format": FORMAT,
            "name": self.name,
            "version": self.version,
            "built_at": self.built_at,
            "lmpack_version": self.lmpack_version,
            "provenance": self.provenance,
            "variants": [v.to_dict() for v in self.variants],
            "totals": {"bytes": self.total_bytes, "files": self.total_files},
            "files": [f.to_dict() for f in self.files],
        }

    def to_bytes(self) -> bytes:
        """The canonical encoding: sorted keys, ASCII, two-space indent, one trailing newline."""
        return (json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=True) + "\n").encode("ascii")


# --- names, paths, versions -------------------------------------------------------------------------------


def check_relative_path(path: object, *, what: str) -> str:
    """The one check for a path inside a bundle: relative POSIX, no '..', '.', empty parts, '\\', NUL or controls."""
    if not isinstance(path, str) or not path:
        raise BundleError(f"{what}: a path must be a non-empty string, got {path!r}")
    if len(path) > MAX_PATH_CHARS:
        raise BundleError(f"{what}: path longer than {MAX_PATH_CHARS} characters")
    if "\\" in path:
        raise BundleError(f"{what}: path {path!r} contains a backslash")
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise BundleError(f"{what}: path {path!r} contains NUL or a control character")
    if path.startswith("/"):
        raise BundleError(f"{what}: path {path!r} is absolute")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise BundleError(f"{what}: path {path!r} has an empty, '.' or '..' part")
        if len(part.encode("utf-8", "surrogatepass")) > MAX_PART_BYTES:
            raise BundleError(f"{what}: path {path!r} has a part longer than {MAX_PART_BYTES} bytes")
    return path


def collision_key(path: str) -> str:
    """Names that a case-insensitive or normalizing file system would store as the same file."""
    return unicodedata.normalize("NFC", path).casefold()


def check_name(name: object, *, what: str) -> str:
    """Bundle and variant names become directory names: a safe single path part."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise BundleError(
            f"{what}: {name!r} is not a valid name (letters, digits, '.', '_', '-'; "
            "starts with a letter or digit; at most 128 characters)"
        )
    return name


def parse_version(version: object, *, what: str = "version") -> tuple[int, int, int]:
    """MAJOR.MINOR.PATCH, numbers only: ordered as integers, so 1.10.0 > 1.9.0, and usable as a directory name."""
    match = VERSION_RE.match(version) if isinstance(version, str) else None
    if not match:
        raise BundleError(
            f"{what}: {version!r} is not a version MAJOR.MINOR.PATCH (e.g. 1.0.0)",
            hint="bundle versions are three non-negative integers, compared numerically",
        )
    return int(match[1]), int(match[2]), int(match[3])


# --- the strict parser -----------------------------------------------------------------------------------


def parse_manifest(data: bytes) -> Manifest:
    """Parse and check manifest bytes; every name, digest, size and total is validated here, once."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{MANIFEST} is larger than {MAX_MANIFEST_BYTES >> 20} MiB")
    try:
        raw = json.loads(data.decode("utf-8"), object_pairs_hook=no_duplicate_keys, parse_constant=no_constants)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{MANIFEST} is not valid JSON: {exc}") from exc
    except RecursionError:  # json's own limit, about a thousand levels: far past any manifest's three
        raise BundleError(f"{MANIFEST} is nested too deeply to be a manifest") from None
    top = Fields(raw, "")
    version = top.get("schema_version", (int,))
    if version not in READABLE_SCHEMAS:
        raise BundleError(
            f"{MANIFEST}: schema_version {version} is not supported (this lmpack reads "
            f"{', '.join(map(str, READABLE_SCHEMAS))})",
            hint="a newer bundle needs a newer lmpack on this host" if version > SCHEMA_VERSION else None,
        )
    if top.str("format") != FORMAT:
        raise BundleError(f"{MANIFEST}: field 'format' must be {FORMAT!r}")
    name = check_name(top.str("name"), what=f"{MANIFEST}: field 'name'")
    bundle_version = top.str("version")
    parse_version(bundle_version, what=f"{MANIFEST}: field 'version'")
    built_at = top.str("built_at", max_len=64)
    _check_timestamp(built_at)
    lmpack_version = top.str("lmpack_version", _WORD_RE)
    files = tuple(_parse_file(item, i) for i, item in enumerate(top.list("files", MAX_FILES)))
    variants = tuple(_parse_variant(item, i) for i, item in enumerate(top.list("variants", 1000)))
    top.list("provenance", 1000)  # derived from the variants; checked for equality below
    totals = top.obj("totals")
    total_bytes = totals.int("bytes", 0, MAX_TOTAL_BYTES)
    total_files = totals.int("files", 0, MAX_FILES)
    totals.finish()
    wheelhouse = _parse_wheelhouse(top.obj("wheelhouse")) if version >= 2 else None
    top.finish()
    manifest = Manifest(
        name=name,
        version=bundle_version,
        built_at=built_at,
        lmpack_version=lmpack_version,
        variants=variants,
        files=files,
        wheelhouse=wheelhouse,
    )
    _check_consistency(manifest, raw, total_bytes, total_files)
    return manifest


def _parse_wheelhouse(w: Fields) -> Wheelhouse:
    wheelhouse = Wheelhouse(
        platform_tag=w.str("platform_tag", _WORD_RE),
        python=w.str("python", _PYTHON_RE),
        lock=check_relative_path(w.str("lock"), what=f"{MANIFEST}: field 'wheelhouse.lock'"),
        wheels=w.int("wheels", 1, MAX_FILES),
        bytes=w.int("bytes", 0, MAX_TOTAL_BYTES),
    )
    w.finish()
    return wheelhouse


def _check_timestamp(value: str) -> None:
    """built_at is informational (validity never depends on the clock), but it must still be a timestamp."""
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise BundleError(f"{MANIFEST}: field 'built_at' must be an ISO 8601 time with a zone, got {value!r}")


def _parse_file(item: Any, index: int) -> FileEntry:
    where = f"files[{index}]"
    entry = Fields(item, where)
    path = check_relative_path(entry.str("path", max_len=MAX_PATH_CHARS), what=f"{MANIFEST}: field '{where}.path'")
    size = entry.int("size", 0, MAX_FILE_BYTES)
    mode = entry.str("mode")
    if mode not in MODES:
        raise BundleError(f"{MANIFEST}: field '{where}.mode' must be one of {sorted(MODES)}, got {mode!r}")
    digest = entry.str("sha256", DIGEST_RE)
    entry.finish()
    return FileEntry(path=path, size=size, mode=MODES[mode], sha256=digest)


def _parse_variant(item: Any, index: int) -> VariantEntry:
    where = f"variants[{index}]"
    v = Fields(item, where)
    name = check_name(v.str("name"), what=f"{MANIFEST}: field '{where}.name'")
    if v.str("path") != f"{VARIANTS_DIR}/{name}":
        raise BundleError(f"{MANIFEST}: field '{where}.path' must be '{VARIANTS_DIR}/{name}'")
    providers = v.list("execution_providers", 8)
    if not providers or not all(isinstance(p, str) and _WORD_RE.match(p) for p in providers):
        raise BundleError(f"{MANIFEST}: field '{where}.execution_providers' must be a non-empty list of names")
    provenance = v.obj("provenance")
    source = {key: provenance.str(key, nullable=key != "kind") for key in _PROVENANCE_KEYS}
    provenance.finish()
    entry = VariantEntry(
        name=name,
        target=v.str("target", _WORD_RE),
        profile=v.str("profile", _WORD_RE),
        precision=v.str("precision", _WORD_RE),
        task=v.str("task", _WORD_RE, nullable=True),
        execution_providers=tuple(providers),
        compatibility=_parse_compatibility(v.obj("compatibility")),
        provenance=source,
    )
    v.finish()
    return entry


def _parse_compatibility(c: Fields) -> Compatibility:
    cpu = c.obj("cpu")
    arch = cpu.str("arch")
    if arch not in _ARCHES:
        raise BundleError(f"{MANIFEST}: field '{cpu.where}.arch' must be one of {list(_ARCHES)}, got {arch!r}")
    isa = cpu.list("isa", 32)
    if not all(isinstance(i, str) and _WORD_RE.match(i) for i in isa):
        raise BundleError(f"{MANIFEST}: field '{cpu.where}.isa' must be a list of instruction-set names")
    cpu.finish()
    gpu = None
    if (g := c.obj("gpu", nullable=True)) is not None:
        match = g.str("match")
        if match not in ("minimum", "exact"):
            raise BundleError(f"{MANIFEST}: field '{g.where}.match' must be 'minimum' or 'exact'")
        gpu = GpuRequirement(
            vendor=g.str("vendor", _WORD_RE),
            compute_capability=g.str("compute_capability", re.compile(r"^[0-9]{1,2}\.[0-9]{1,2}\Z")),
            match=match,
            min_memory_bytes=g.int("min_memory_bytes", 0, MAX_TOTAL_BYTES),
        )
        g.finish()
    rule = Compatibility(
        cpu_arch=arch, cpu_isa=tuple(isa), gpu=gpu, min_memory_bytes=c.int("min_memory_bytes", 0, MAX_TOTAL_BYTES)
    )
    c.finish()
    return rule


def _check_consistency(manifest: Manifest, raw: dict, total_bytes: int, total_files: int) -> None:
    """Cross-field rules: sorted unique paths, no file that is also a directory, totals that add up."""
    paths = [f.path for f in manifest.files]
    if paths != sorted(paths):
        raise BundleError(f"{MANIFEST}: files must be sorted by path")
    keys: set[str] = set()
    directories: set[str] = set()
    for path in paths:
        key = collision_key(path)
        if key in keys:
            raise BundleError(f"{MANIFEST}: {path!r} is listed twice (names are compared without case)")
        if path in RESERVED or path.split("/")[0] in RESERVED_DIRS:
            raise BundleError(f"{MANIFEST}: {path!r} is reserved and cannot be a listed file")
        keys.add(key)
        parts = key.split("/")
        directories.update("/".join(parts[:i]) for i in range(1, len(parts)))
    if clash := sorted(keys & directories):
        raise BundleError(f"{MANIFEST}: {clash[0]!r} is listed as a file and used as a directory")
    if total_files != manifest.total_files or total_bytes != manifest.total_bytes:
        raise BundleError(
            f"{MANIFEST}: totals say {total_files} files, {total_bytes} bytes but the files add up to "
            f"{manifest.total_files} files, {manifest.total_bytes} bytes"
        )
    names = [v.name for v in manifest.variants]
    if len({collision_key(n) for n in names}) != len(names):
        raise BundleError(f"{MANIFEST}: two variants have the same name")
    for variant in manifest.variants:
        if not any(p.startswith(variant.path + "/") for p in paths):
            raise BundleError(f"{MANIFEST}: variant {variant.name!r} has no files under {variant.path}/")
    if manifest.wheelhouse is not None and manifest.wheelhouse.lock not in manifest.by_path:
        raise BundleError(f"{MANIFEST}: the wheelhouse lock {manifest.wheelhouse.lock!r} is not a listed file")
    if raw["provenance"] != manifest.provenance:
        raise BundleError(f"{MANIFEST}: field 'provenance' does not match the variants' provenance")
