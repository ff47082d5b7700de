"""Freed heap goes back to the system after loading (glibc's malloc_trim), measured on this process."""

from __future__ import annotations

import platform

import pytest

from lmpack.runtime.heap import release_freed_heap


def resident_kib() -> int:
    for line in open("/proc/self/status", encoding="ascii"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_freed_small_allocations_are_handed_back():
    # many small objects live on the heap (not in their own mmap), so freeing them leaves it mapped
    held = [bytearray(2000) for _ in range(40_000)]   # about 80 MB
    for block in held:
        block[0] = 1
    del held
    before = resident_kib()
    assert release_freed_heap()
    assert before - resident_kib() > 40_000   # most of the 80 MB left the process
