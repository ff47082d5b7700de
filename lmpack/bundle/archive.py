"""The bundle tarball: a deterministic writer and a reader that rejects hostile archives before extracting.

Reading never uses tarfile's extract functions. Each pass walks the member headers itself and checks
every one against the manifest (name, type, duplicates, case collisions, listed, size, running
totals) before any of its data is used; the decompressed stream is also bounded by the manifest's
totals, so a bomb stops at the header that declares it, not after filling the disk. Python's own
`data` extraction filter is not used as a defence: it rewrites some bad names instead of rejecting
them, and it has been bypassed several times.

Runtime-side: standard library and lmpack.bundle.manifest only.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

from lmpack.bundle.manifest import (
    MANIFEST,
    MAX_MANIFEST_BYTES,
    MAX_PATH_CHARS,
    SIGNATURE,
    FileEntry,
    Manifest,
    check_relative_path,
    collision_key,
    parse_manifest,
)
from lmpack.errors import BundleError, VerificationError

MAX_SIGNATURE_BYTES = 4096
COMPRESS_LEVEL = 1  # fixed: the level is part of the bytes; 1 was faster and smaller than 6 on int8 ONNX weights
_CHUNK = 1 << 20
_HEAD_ALLOWANCE = MAX_MANIFEST_BYTES + MAX_SIGNATURE_BYTES + 16 * 1024
_MEMBER_OVERHEAD = 3 * 512 + 2 * MAX_PATH_CHARS  # header + PAX header for a long name, generously
_TYPE_NAMES = {
    tarfile.SYMTYPE: "a symlink",
    tarfile.LNKTYPE: "a hardlink",
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a FIFO",
    tarfile.DIRTYPE: "a directory",
    tarfile.GNUTYPE_SPARSE: "a sparse file",
    tarfile.CONTTYPE: "a contiguous file",
}


# --- writing ---------------------------------------------------------------------------------------------


class ByteStream(Protocol):
    """What file data is read through: an open file, a tar member, or a wrapper of either."""

    def read(self, size: int = -1, /) -> bytes: ...


class HashingReader:
    """Wraps a stream and digests what is read through it, so a copy is verified in the same pass."""

    def __init__(self, stream: ByteStream):
        self.stream, self.sha256, self.count = stream, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.sha256.update(data)
        self.count += len(data)
        return data

    def mismatch(self, entry: FileEntry) -> str | None:
        """Why what was read is not `entry`, or None when size and digest agree."""
        if self.count != entry.size:
            return (
                f"{entry.path}: truncated ({self.count} of {entry.size} bytes)"
                if self.count < entry.size
                else f"{entry.path}: larger than the manifest says ({entry.size} bytes)"
            )
        if self.sha256.hexdigest() != entry.sha256:
            return f"{entry.path}: sha256 differs from the manifest (altered)"
        return None


def _add(tf: tarfile.TarFile, name: str, mode: int, size: int, stream: ByteStream) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.type = size, mode, 0, tarfile.REGTYPE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tf.addfile(info, stream)


def write_tarball(
    path: Path, manifest_bytes: bytes, signature_bytes: bytes | None, items: Iterable[tuple[FileEntry, ByteStream]]
) -> None:
    """Write the bundle at `path`: manifest.json, manifest.sig, then the files in manifest order.

    Every header is fixed (mtime 0, uid/gid 0, no owner names, the manifest's mode) and the gzip header
    carries neither a time nor a file name, so the same input always gives the same bytes. Each file is
    digested while it is copied, so what lands in the tarball is what the manifest says.
    """
    with open(path, "xb") as raw:
        with (
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=COMPRESS_LEVEL) as gz,
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tf,
        ):
            _add(tf, MANIFEST, 0o644, len(manifest_bytes), io.BytesIO(manifest_bytes))
            if signature_bytes is not None:
                _add(tf, SIGNATURE, 0o644, len(signature_bytes), io.BytesIO(signature_bytes))
            for entry, stream in items:
                reader = HashingReader(stream)
                try:
                    _add(tf, entry.path, entry.mode, entry.size, reader)
                except OSError as exc:
                    if exc.errno is not None:  # a real I/O error (disk full): not the source's fault
                        raise
                    raise VerificationError(f"{entry.path}: truncated ({reader.count} of {entry.size} bytes)") from exc
                if problem := reader.mismatch(entry):
                    raise VerificationError(problem)
        raw.flush()
        os.fsync(raw.fileno())


# --- reading ---------------------------------------------------------------------------------------------


def _too_much(limit: int) -> BundleError:
    return BundleError(
        f"archive holds more data than its manifest declares ({limit} bytes with headers); stopped before reading it",
        hint="the bundle is damaged or a decompression bomb",
    )


class _Bounded(io.RawIOBase):
    """The decompressed stream, refusing to read or seek past `limit`: the bomb guard under tarfile."""

    def __init__(self, inner: gzip.GzipFile, limit: int):
        self.inner, self.limit = inner, limit

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.inner.tell()

    def _refuse(self) -> BundleError:
        return _too_much(self.limit)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = offset if whence == io.SEEK_SET else self.inner.tell() + offset if whence == io.SEEK_CUR else None
        if target is None or target > self.limit:
            raise self._refuse()
        return self.inner.seek(target)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or self.inner.tell() + size > self.limit:
            raise self._refuse()
        return self.inner.read(size)

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class TarBundle:
    """A bundle tarball, opened once (so a swap of the path mid-install changes nothing) and read in passes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open(self.path, "rb")
        self.manifest_bytes: bytes = b""
        self.signature_bytes: bytes | None = None
        self._head_read = False
        try:
            for _ in self._scan(head_only=True):
                pass
            self.manifest: Manifest = parse_manifest(self.manifest_bytes)
        except BaseException:
            self._file.close()
            raise
        self._head_read = True

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> TarBundle:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check_structure(self) -> list[str]:
        """Pass 1, headers only: raises BundleError for a hostile member, returns missing/extra/size problems;
        then the compressed stream itself must be one whole gzip member and nothing after it."""
        problems = [problem for _, problem in self._scan() if problem]
        self._check_gzip_stream()
        return problems

    def _check_gzip_stream(self) -> None:
        """The tar walk stops at the archive's end marker, so a gzip trailer cut off (its CRC and length) or bytes
        appended after it were never looked at: inflate the whole file once, bounded like every pass."""
        self._file.seek(0)
        inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip framing: the trailer's CRC and size are checked
        produced, limit = 0, self._limit()
        try:
            while chunk := self._file.read(_CHUNK):
                if inflate.eof:
                    raise BundleError(f"{self.path} has data after the end of its gzip stream")
                produced += len(inflate.decompress(chunk, _CHUNK))
                while inflate.unconsumed_tail and not inflate.eof:
                    produced += len(inflate.decompress(inflate.unconsumed_tail, _CHUNK))
                    if produced > limit:
                        raise _too_much(limit)
                if produced > limit:
                    raise _too_much(limit)
        except zlib.error as exc:
            raise _damaged(self.path, exc) from exc
        if not inflate.eof:
            raise _damaged(self.path, EOFError("the gzip stream ends early (its trailer is missing)"))
        if inflate.unused_data:
            raise BundleError(f"{self.path} has data after the end of its gzip stream")

    def contents(self) -> Iterator[tuple[FileEntry, ByteStream]]:
        """Pass 2: each listed file's stream in archive order; headers are checked again on the way."""
        for item, problem in self._scan(with_data=True):
            if problem:
                raise VerificationError(problem, hint="the archive changed between two readings")
            entry, stream = item
            yield entry, _GuardedStream(stream, self.path)

    def _limit(self) -> int:
        if not self._head_read:
            return _HEAD_ALLOWANCE
        m = self.manifest
        return (
            len(self.manifest_bytes)
            + MAX_SIGNATURE_BYTES
            + m.total_bytes
            + (m.total_files + 3) * _MEMBER_OVERHEAD
            + 2 * tarfile.RECORDSIZE
        )

    def _scan(self, *, head_only: bool = False, with_data: bool = False) -> Iterator:
        """Walk every member header; the one place that decides whether a member is acceptable."""
        self._file.seek(0)
        try:
            gz = gzip.GzipFile(fileobj=self._file, mode="rb")
            bounded = _Bounded(gz, self._limit())
            try:
                tf = tarfile.open(fileobj=bounded, mode="r:")
            except ValueError as exc:  # tarfile's own parse of a malformed header (a sparse map, a number)
                raise BundleError(f"{self.path}: an archive member's header is malformed: {exc}") from exc
            yield from self._members(tf, head_only=head_only, with_data=with_data)
        except _DAMAGED as exc:
            raise _damaged(self.path, exc) from exc

    def _members(self, tf: tarfile.TarFile, *, head_only: bool, with_data: bool) -> Iterator:
        seen_keys: set[str] = set()
        listed_seen: set[str] = set()
        count = total = 0
        for index, member in enumerate(iter(lambda: _next_member(tf), None)):
            name = _check_member_header(member)
            key = collision_key(name)
            if key in seen_keys:
                raise BundleError(f"archive member {name!r} appears twice (names are compared without case)")
            seen_keys.add(key)
            if name in (MANIFEST, SIGNATURE):
                self._read_head_member(tf, member, index)
                continue
            if index == 0:
                raise BundleError(f"the first archive member must be {MANIFEST}, got {name!r}")
            if head_only:
                return
            manifest = self.manifest
            entry = manifest.by_path.get(name)
            if entry is None:  # never acceptable: stop here rather than read past it
                raise VerificationError(f"{name}: extra file, not listed in {MANIFEST}")
            count, total = count + 1, total + member.size
            if count > manifest.total_files or total > manifest.total_bytes:
                raise BundleError(
                    f"archive member {name!r} takes the archive past the manifest's totals "
                    f"({manifest.total_files} files, {manifest.total_bytes} bytes); stopped before "
                    "extracting anything",
                    hint="the bundle is damaged or a decompression bomb",
                )
            listed_seen.add(name)
            if member.size > entry.size:
                raise VerificationError(f"{name}: larger than the manifest says ({member.size} > {entry.size} bytes)")
            if member.size < entry.size:
                yield None, f"{name}: truncated ({member.size} of {entry.size} bytes)"
                continue
            yield (entry, tf.extractfile(member) if with_data else None), None
        if not self.manifest_bytes:
            raise BundleError(f"archive has no {MANIFEST}")
        if not head_only:
            for path in sorted(set(self.manifest.by_path) - listed_seen):
                yield None, f"{path}: missing (listed in {MANIFEST}, not in the archive)"

    def _read_head_member(self, tf: tarfile.TarFile, member: tarfile.TarInfo, index: int) -> None:
        """manifest.json must be member 0 and manifest.sig, if any, member 1; both small, read into memory."""
        is_manifest = member.name == MANIFEST
        if index != (0 if is_manifest else 1):
            raise BundleError(
                f"archive member {member.name!r} is out of place (must be member {0 if is_manifest else 1})"
            )
        limit = MAX_MANIFEST_BYTES if is_manifest else MAX_SIGNATURE_BYTES
        if member.size > limit:
            raise BundleError(f"archive member {member.name!r} is larger than {limit} bytes")
        handle = tf.extractfile(member)
        assert handle is not None  # a regular file (_check_member_header): extractfile gives its data
        data = handle.read()
        previous = self.manifest_bytes if is_manifest else self.signature_bytes
        if self._head_read and data != previous:
            raise VerificationError(f"{member.name} changed while the bundle was being read")
        if is_manifest:
            self.manifest_bytes = data
        else:
            self.signature_bytes = data


_DAMAGED = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)


def _next_member(tf: tarfile.TarFile) -> tarfile.TarInfo | None:
    """The next member header; tarfile's ValueError on a malformed one (a sparse map, a bad number) is the
    archive's fault, said as such, not an internal error."""
    try:
        return tf.next()
    except ValueError as exc:
        raise BundleError(f"an archive member's header is malformed: {exc}") from exc


def _damaged(path: Path, exc: BaseException) -> BundleError:
    return BundleError(
        f"{path} is not a complete bundle archive: {exc}",
        hint="copy the bundle again; compare its sha256 with the one on the build host",
    )


class _GuardedStream:
    """A member's data stream whose read errors (a truncated or corrupt archive) become BundleError."""

    def __init__(self, stream: ByteStream, path: Path):
        self.stream, self.path = stream, path

    def read(self, size: int = -1) -> bytes:
        try:
            return self.stream.read(size)
        except _DAMAGED as exc:
            raise _damaged(self.path, exc) from exc


def _check_member_header(member: tarfile.TarInfo) -> str:
    """Name and type of one member: regular files with safe relative names only; everything else is refused."""
    name = check_relative_path(member.name, what=f"archive member {member.name!r}")
    if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        kind = _TYPE_NAMES.get(member.type, f"of tar type {member.type!r}")
        raise BundleError(f"archive member {name!r} is {kind}; bundles hold regular files only")
    # A PAX sparse file is a regular member whose headers say its data is a map of holes (GNU.sparse.*)
    if member.issparse() or any(key.startswith("GNU.sparse") for key in member.pax_headers):
        raise BundleError(f"archive member {name!r} is a sparse file; bundles hold regular files only")
    return name


# --- extraction ------------------------------------------------------------------------------------------


def create_in(root: Path, entry: FileEntry) -> int:
    """Open a new file for `entry` under `root` for writing; containment is checked on resolved paths.

    The parent is resolved (following any link) and must be `root` or inside it, compared part by part,
    never as a string prefix (/srv/dest-evil starts with /srv/dest). The file itself is created with
    O_EXCL|O_NOFOLLOW, so neither an existing file nor a planted link is written through.
    """
    check_relative_path(entry.path, what=f"{MANIFEST} entry")
    resolved_root = root.resolve(strict=True)
    parent = (root / entry.path).parent.resolve()
    if parent != resolved_root and not parent.is_relative_to(resolved_root):
        raise BundleError(f"{entry.path}: resolves outside the extraction directory")
    parent.mkdir(parents=True, exist_ok=True)
    if parent.resolve(strict=True) != parent:
        raise BundleError(f"{entry.path}: a parent directory changed into a link during extraction")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(parent / Path(entry.path).name, flags, 0o600)


def drain(stream: ByteStream, entry: FileEntry, fd: int | None = None) -> str | None:
    """Read `entry`'s data once, digesting it and copying it into `fd` if given (then fsync, set the mode).

    Reads at most one byte more than the manifest allows, so an oversized source costs nothing.
    Returns the problem (truncated, larger, altered) or None.
    """
    reader = HashingReader(stream)
    out = open(fd, "wb", closefd=True) if fd is not None else None
    try:
        while chunk := reader.read(min(_CHUNK, entry.size - reader.count + 1)):
            if out is not None:
                out.write(chunk)
            if reader.count > entry.size:
                break
        if out is not None:
            out.flush()
            os.fchmod(out.fileno(), entry.mode)
            os.fsync(out.fileno())
    finally:
        if out is not None:
            out.close()
    return reader.mismatch(entry)
