"""The CMake flags that build llama.cpp (llama-cpp-python) for the CPU this runs on, and no further.

    CMAKE_ARGS="$(python bench/llamacpp_flags.py)" pip install llama-cpp-python==0.3.36

GGML_NATIVE (the default) compiles for whatever the compiler detects, which on some virtual machines includes AMX
that the hypervisor does not pass through (a general protection fault in libggml-cpu); a fixed list that turns
AVX-512 on crashes with an illegal instruction on an AVX2-only host (a Zen 3 EPYC). So each instruction set is
turned on only when /proc/cpuinfo lists it, and AMX never (its tiles need the kernel's permission, which a guest
may not get). Not x86-64: no flags, the native build.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

# (GGML option, the /proc/cpuinfo flags it needs): llama.cpp's ggml/CMakeLists.txt options for x86-64
X86_OPTIONS = (
    ("GGML_SSE42", ("sse4_2",)),
    ("GGML_AVX", ("avx",)),
    ("GGML_AVX2", ("avx2",)),
    ("GGML_FMA", ("fma",)),
    ("GGML_F16C", ("f16c",)),
    ("GGML_BMI2", ("bmi2",)),
    ("GGML_AVX_VNNI", ("avx_vnni",)),
    ("GGML_AVX512", ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd")),
    ("GGML_AVX512_VBMI", ("avx512vbmi",)),
    ("GGML_AVX512_VNNI", ("avx512_vnni",)),
    ("GGML_AVX512_BF16", ("avx512_bf16",)),
)
NEVER = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")


def cmake_args(cpu_flags: set[str], machine: str = "x86_64") -> list[str]:
    if machine not in ("x86_64", "AMD64"):
        return []
    args = ["-DGGML_NATIVE=OFF"]
    args += [f"-D{option}={'ON' if all(f in cpu_flags for f in needs) else 'OFF'}" for option, needs in X86_OPTIONS]
    return args + [f"-D{option}=OFF" for option in NEVER]


def host_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


if __name__ == "__main__":
    sys.stdout.write(" ".join(cmake_args(host_flags(), platform.machine())) + "\n")
