"""Keeping memory the runtime no longer uses out of the server's resident set.

Loading a model frees a lot of short-lived memory (the tokenizer's parsed JSON, the session's graph
transformations); glibc keeps it mapped for later mallocs, so it would count in the server's resident
memory for its whole life: release_freed_heap hands it back (glibc's malloc_trim; elsewhere it does nothing).

KV caches are large and come and go with every request: mapped_zeros gives them memory of their own that
is resident only where written (so a cache can be made for all the positions its request may reach) and
leaves the process when freed.
"""

from __future__ import annotations

import ctypes
import functools
import math
import mmap
from typing import Any

import numpy as np


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(None).malloc_trim   # the process's own C library
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
    took peak resident memory from 383-384 MB to 286-293 MB (docs/serving.md, "Memory").
    """
    dtype = np.dtype(dtype)
    size = math.prod(shape) * dtype.itemsize
    if size == 0 or not hasattr(mmap, "MAP_PRIVATE"):   # mmap refuses length 0; Windows has no MAP_PRIVATE
        return np.zeros(shape, dtype=dtype)
    try:
        mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)   # anonymous: fileno -1
    except OSError as exc:   # ENOMEM: over the commit limit where overcommit is strict (vm.overcommit_memory=2)
        raise MemoryError(f"could not map {size / 2**20:.1f} MiB for a KV cache: {exc.strerror}") from exc
    return np.frombuffer(mapping, dtype=dtype).reshape(shape)   # the array keeps the mapping alive
