"""The libraries a Linux shared object asks the dynamic loader for (DT_NEEDED) and where it tells it to look
(DT_RUNPATH / DT_RPATH): read from the file, nothing loaded.

lmpack needs this once: to learn which libnvinfer onnxruntime's TensorRT provider links against, which is
the TensorRT that builds and runs its engines (runtime/host.py). pyelftools answers the same question; it
was left out because it would have to travel in every GPU wheelhouse for this one read of 64-bit
little-endian ELF files, which is all onnxruntime-gpu ships for Linux.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

_MAGIC = b"\x7fELF"
_ELFCLASS64, _ELFDATA2LSB = 2, 1
_SHT_DYNAMIC = 6
_DT_NULL, _DT_NEEDED, _DT_RPATH, _DT_RUNPATH = 0, 1, 15, 29


@dataclass(frozen=True)
class DynamicSection:
    needed: tuple[str, ...]
    search_path: tuple[str, ...]  # DT_RUNPATH, else DT_RPATH, split on ":"; "$ORIGIN" left as written


def read_dynamic(path: Path) -> DynamicSection | None:
    """The dynamic section of a 64-bit little-endian ELF file; None for anything else or a damaged file."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    if data[:4] != _MAGIC or data[4] != _ELFCLASS64 or data[5] != _ELFDATA2LSB:
        return None
    try:
        return _parse(data)
    except (struct.error, IndexError, UnicodeDecodeError):
        return None


def _parse(data: bytes) -> DynamicSection | None:
    (section_offset,) = struct.unpack_from("<Q", data, 0x28)
    entry_size, count = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, section_offset + i * entry_size) for i in range(count)]
    dynamic = next((s for s in sections if s[1] == _SHT_DYNAMIC), None)
    if dynamic is None:
        return None
    strings = sections[dynamic[6]]  # sh_link: the section holding the dynamic section's strings
    string_offset = strings[4]

    def text(offset: int) -> str:
        start = string_offset + offset
        return data[start : data.index(b"\0", start)].decode()

    needed, rpath, runpath = [], "", ""
    for at in range(dynamic[4], dynamic[4] + dynamic[5], 16):
        tag, value = struct.unpack_from("<qQ", data, at)
        if tag == _DT_NULL:
            break
        if tag == _DT_NEEDED:
            needed.append(text(value))
        elif tag == _DT_RPATH:
            rpath = text(value)
        elif tag == _DT_RUNPATH:
            runpath = text(value)
    search = runpath or rpath
    return DynamicSection(tuple(needed), tuple(p for p in search.split(":") if p))
