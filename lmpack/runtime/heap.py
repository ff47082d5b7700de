"""Keeping memory the runtime no longer uses out of the server's resident set.

Loading a model frees a lot of short-lived memory (the tokenizer's parsed JSON, the session's graph
transformations); glibc keeps it mapped for later mallocs, so it would count in the server's resident
memory for its whole life: release_freed_heap hands it back (glibc's malloc_trim; elsewhere it does nothing).

KV caches are large and come and go with every request: mapped_zeros gives them memory of their own that
is resident only where written (so a cache can be made for all the positions its request may reach) and
leaves the process when freed.

onnxruntime maps the weights file and packs each MatMul's weight into memory of its own; a weight that
another node reads too (the 8-bit LM head an `int4` variant's embedding gathers rows from) keeps its
mapping, with every page the packing read resident. release_file_pages hands such pages back: they are
read again from the file (the page cache) where a node needs them.
"""

from __future__ import annotations

import ctypes
import functools
import math
import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(None).malloc_trim  # the process's own C library
    except (OSError, AttributeError):
        return None


def release_freed_heap() -> bool:
    """Return freed heap pages to the system; False where the C library has no malloc_trim."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def mapped_zeros(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A zeroed array in an anonymous memory mapping of its own.

    Its pages take memory only once written, and the mapping goes back to the system as soon as the array
    is freed. np.zeros of the same size need not: once the process has freed a large block, glibc raises
    its mmap threshold (up to 32 MB) and serves later large requests from its heap, zeroing (so touching)
    every page and keeping them after the free. For SmolLM2 int8 with 8 concurrent generations this
    lowered the peak resident memory at the same decode speed (docs/serving.md, "Memory").
    """
    dtype = np.dtype(dtype)
    size = math.prod(shape) * dtype.itemsize
    if size == 0 or not hasattr(mmap, "MAP_PRIVATE"):  # mmap refuses length 0; Windows has no MAP_PRIVATE
        return np.zeros(shape, dtype=dtype)
    try:
        mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)  # anonymous: fileno -1
    except OSError as exc:  # ENOMEM: over the commit limit where overcommit is strict (vm.overcommit_memory=2)
        raise MemoryError(f"could not map {size / 2**20:.1f} MiB for a KV cache: {exc.strerror}") from exc
    return np.frombuffer(mapping, dtype=dtype).reshape(shape)  # the array keeps the mapping alive


@functools.cache
def _madvise() -> Any:
    try:
        function = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return function


def _file_mappings(smaps: str) -> Iterator[tuple[int, int, str, int, int]]:
    """(start, end, path, resident KiB, modified KiB) of each file mapping in /proc/<pid>/smaps text."""
    mapping: list[Any] | None = None  # the fields above, in that order
    for line in smaps.splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
            if mapping and mapping[2]:
                yield tuple(mapping)
            start, end = (int(part, 16) for part in fields[0].split("-"))
            mapping = [start, end, " ".join(fields[5:]) if len(fields) > 5 else "", 0, 0]
        elif mapping and fields[:1] == ["Rss:"]:
            mapping[3] = int(fields[1])
        elif mapping and fields[:1] == ["Anonymous:"]:  # private pages written since mapping: the file lacks them
            mapping[4] = int(fields[1])
    if mapping and mapping[2]:
        yield tuple(mapping)


def file_mappings_under(directory: Path) -> list[tuple[int, int, int, int]]:
    """(start, end, resident KiB, modified KiB) of this process's mappings of files under `directory`;
    empty where the system has no /proc/self/smaps."""
    try:
        smaps = Path("/proc/self/smaps").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    prefix = str(Path(directory).resolve()) + os.sep
    return [
        (start, end, resident, modified)
        for start, end, path, resident, modified in _file_mappings(smaps)
        if path.startswith(prefix)
    ]


def release_file_pages(directory: Path) -> int:
    """Drop this process's resident pages of the files under `directory` it maps and has not written to.

    Returns the KiB released (0 where the system has no /proc/self/smaps or madvise). A mapping with a page
    written since it was made is left alone, since only the file's own content comes back on the next read.
    """
    advise, dontneed = _madvise(), getattr(mmap, "MADV_DONTNEED", None)
    if advise is None or dontneed is None:
        return 0
    released = 0
    for start, end, resident, modified in file_mappings_under(directory):
        if resident and not modified and advise(start, end - start, dontneed) == 0:
            released += resident
    return released
