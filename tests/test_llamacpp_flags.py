"""bench/llamacpp_flags.py: llama.cpp's build flags follow the CPU's, so the peer builds and runs on any x86-64."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SPEC = importlib.util.spec_from_file_location(
    "llamacpp_flags", Path(__file__).parents[1] / "bench" / "llamacpp_flags.py"
)
assert SPEC is not None and SPEC.loader is not None
flags = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(flags)

ZEN3 = {"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"}  # an EPYC 7003: AVX2, no AVX-512, no VNNI
SAPPHIRE_RAPIDS = (
    ZEN3
    | {"avx_vnni", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd", "avx512vbmi"}
    | {
        "avx512_vnni",
        "avx512_bf16",
        "amx_tile",
        "amx_int8",
        "amx_bf16",
    }
)


def _on(args: list[str]) -> set[str]:
    return {arg[2:].split("=")[0] for arg in args if arg.endswith("=ON")}


def test_an_avx2_host_gets_no_avx512():
    args = flags.cmake_args(ZEN3)
    assert "-DGGML_NATIVE=OFF" in args
    assert _on(args) == {"GGML_SSE42", "GGML_AVX", "GGML_AVX2", "GGML_FMA", "GGML_F16C", "GGML_BMI2"}


def test_an_avx512_host_gets_it_but_never_amx():
    on = _on(flags.cmake_args(SAPPHIRE_RAPIDS))
    assert {"GGML_AVX512", "GGML_AVX512_VNNI", "GGML_AVX512_BF16", "GGML_AVX_VNNI"} <= on
    assert not {"GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16"} & on
    assert "GGML_AVX512" not in _on(flags.cmake_args(ZEN3 | {"avx512f"}))  # AVX512F alone is not the set ggml needs


def test_this_hosts_flags_are_read_and_arm_builds_natively():
    assert "sse4_2" in flags.host_flags() or not Path("/proc/cpuinfo").exists()
    assert flags.cmake_args(SAPPHIRE_RAPIDS, machine="aarch64") == []
