"""Memory the runtime frees leaves the process: freed heap after loading (glibc's malloc_trim), KV cache
buffers (their own mappings), and the weights file's pages a session keeps mapped, measured on this process."""

from __future__ import annotations

import mmap
import platform
import sys

import numpy as np
import pytest

from lmpack.runtime.engine import DecoderEngine
from lmpack.runtime.heap import file_mappings_under, mapped_zeros, release_file_pages, release_freed_heap
from lmpack.runtime.sampling import SamplingParams
from lmpack.runtime.select import prepare_variant


def resident_kib() -> int:
    for line in open("/proc/self/status", encoding="ascii"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_freed_small_allocations_are_handed_back():
    # many small objects live on the heap (not in their own mmap), so freeing them leaves it mapped
    held = [bytearray(2000) for _ in range(40_000)]  # about 80 MB
    for block in held:
        block[0] = 1
    del held
    before = resident_kib()
    assert release_freed_heap()
    assert before - resident_kib() > 40_000  # most of the 80 MB left the process


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the mmap threshold that moves is glibc's")
def test_kv_buffers_take_memory_only_where_written_and_leave_when_freed():
    # A large block freed first raises glibc's mmap threshold (here to 24 MB), as loading a model does: from
    # then on np.zeros(16 MB) comes from the heap, zeroed page by page, and stays there when freed.
    raised = np.ones(24 * 1024 * 1024 // 8)
    del raised
    before = resident_kib()
    kv = mapped_zeros((4, 3, 1024, 64 * 4), np.float32)  # 12 MB
    kv[:, :, :16] = 1.0  # the first 16 positions written: 192 KB
    assert resident_kib() - before < 4_000
    assert kv.sum() == 4 * 3 * 16 * 256 and kv.flags.writeable
    kv[:] = 2.0
    written = resident_kib()
    del kv
    assert written - resident_kib() > 10_000  # the whole 12 MB left with the array


def _private_map(path) -> mmap.mmap:
    """The file mapped as onnxruntime maps weights: private, readable and writable, every page read."""
    with open(path, "rb") as file:
        mapping = mmap.mmap(file.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    assert np.frombuffer(mapping, dtype=np.uint8).sum() > 0  # reads every page in
    return mapping


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_mapped_weights_pages_go_back_and_read_the_same(tmp_path):
    weights, other = tmp_path / "model", tmp_path / "elsewhere"
    weights.mkdir()
    other.mkdir()
    content = np.random.default_rng(0).integers(1, 255, 32 * 2**20, dtype=np.uint8)
    for directory in (weights, other):
        content.tofile(directory / "model.onnx.data")
    kept = _private_map(other / "model.onnx.data")  # outside the directory asked for
    mapped = _private_map(weights / "model.onnx.data")
    written = _private_map(weights / "model.onnx.data")  # a page written since mapping
    written[0] = 0
    before = resident_kib()

    released = release_file_pages(weights)

    assert 31_000 < released < 34_000  # the 32 MB read-only one, not the written one nor the other file's
    assert before - resident_kib() > 24_000  # (VmRSS lags by a few MB where other threads allocate meanwhile)
    assert np.array_equal(np.frombuffer(mapped, dtype=np.uint8), content)  # read again from the file
    assert written[0] == 0 and written[1] == content[1]
    assert np.array_equal(np.frombuffer(kept, dtype=np.uint8)[:4096], content[:4096])
    for mapping in (kept, mapped, written):
        mapping.close()


def _resident_kib_of_files_under(directory) -> int:
    return sum(resident for _, _, resident, _ in file_mappings_under(directory))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_a_loaded_engine_holds_none_of_its_weights_files_pages_until_a_step_reads_them(llama_variant):
    engine = DecoderEngine(prepare_variant(llama_variant), threads=1)
    model_dir = engine.variant.onnx_path.parent
    assert _resident_kib_of_files_under(model_dir) == 0  # onnxruntime's packing had read them all in

    completion = engine.generate(engine.encode_prompt("The cat"), SamplingParams(max_tokens=8, temperature=0)).result()

    assert completion.completion_tokens > 0
    assert _resident_kib_of_files_under(model_dir) > 0  # the embedding rows the steps read, from the file
