"""Memory the runtime frees leaves the process: freed heap after loading (glibc's malloc_trim), and KV cache
buffers (their own mappings), measured on this process."""

from __future__ import annotations

import platform

import numpy as np
import pytest

from lmpack.runtime.heap import mapped_zeros, release_freed_heap


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


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the mmap threshold that moves is glibc's")
def test_kv_buffers_take_memory_only_where_written_and_leave_when_freed():
    # A large block freed first raises glibc's mmap threshold (here to 24 MB), as loading a model does: from
    # then on np.zeros(16 MB) comes from the heap, zeroed page by page, and stays there when freed.
    raised = np.ones(24 * 1024 * 1024 // 8)
    del raised
    before = resident_kib()
    kv = mapped_zeros((4, 3, 1024, 64 * 4), np.float32)    # 12 MB
    kv[:, :, :16] = 1.0                                    # the first 16 positions written: 192 KB
    assert resident_kib() - before < 4_000
    assert kv.sum() == 4 * 3 * 16 * 256 and kv.flags.writeable
    kv[:] = 2.0
    written = resident_kib()
    del kv
    assert written - resident_kib() > 10_000                # the whole 12 MB left with the array
