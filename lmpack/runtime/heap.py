"""Handing freed heap memory back to the operating system, where the C library can (glibc's malloc_trim).

Loading a model frees a lot of short-lived memory (the tokenizer's parsed JSON, the session's graph
transformations); glibc keeps it mapped for later mallocs, so it would count in the server's resident
memory for its whole life. Elsewhere (musl, macOS) this does nothing.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any


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
