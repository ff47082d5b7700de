"""What a GPU host is seen to have: NVML facts read one by one (Jetson answers only some), the TensorRT that
onnxruntime's provider really links, two onnxruntime builds installed side by side, and the providers a
variant without an engine gets.

No GPU here: NVML is a stand-in module answering as nvidia-ml-py does (raising its NotSupported error where
Jetson's driver does); the TensorRT provider and libnvinfer are small shared libraries compiled here with
the same names, sonames and links as the real ones, so the ELF reading and the dynamic loading are real.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest
from fake_nvml import fake_nvml

from lmpack.agent.metrics import gpu_sample
from lmpack.runtime.elf import read_dynamic
from lmpack.runtime.host import (
    GpuFacts,
    GpuSoftware,
    HostFacts,
    onnxruntime_conflict,
    onnxruntime_packages,
    probe_gpus,
    probe_tensorrt_version,
)
from lmpack.runtime.trt_cache import apply_plan
from lmpack.runtime.trt_plan import gpu_runtime_problems, plain_providers
from lmpack.runtime.variant import Variant

GIB = 1 << 30
TRT, CUDA_EP, CPU_EP = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"


class NotSupported(Exception):
    """pynvml.NVMLError_NotSupported's stand-in: what Jetson's NVML raises for memory and utilisation."""


def _not_supported(*_):
    raise NotSupported("Not Supported")


def _orin_nvml():
    return fake_nvml(
        nvmlDeviceGetCudaComputeCapability=lambda h: (8, 7),
        nvmlDeviceGetName=lambda h: "Orin (nvgpu)",
        nvmlDeviceGetMemoryInfo=_not_supported,
        nvmlDeviceGetUtilizationRates=_not_supported,
        nvmlDeviceGetTemperature=lambda h, sensor: 41,
        nvmlDeviceGetTotalEccErrors=_not_supported,
    )


def test_a_jetson_gpu_is_seen_with_the_hosts_memory_when_nvml_has_no_memory_figures(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _orin_nvml())
    # the host's memory as psutil reads /proc/meminfo (MemTotal 32000000 kB, MemAvailable 20000000 kB)
    memory = types.SimpleNamespace(total=32000000 * 1024, available=20000000 * 1024)
    monkeypatch.setattr("psutil.virtual_memory", lambda: memory)
    gpus, note = probe_gpus()
    assert note == ""
    assert gpus == (
        GpuFacts(
            name="Orin (nvgpu)",
            compute_capability="8.7",
            memory_bytes=32000000 * 1024,
            free_memory_bytes=20000000 * 1024,
            unified_memory=True,
        ),
    )
    sample = gpu_sample()
    assert sample["available"] and sample["name"] == "Orin (nvgpu)"
    assert sample["gpu_temperature_celsius"] == 41.0  # still read although memory and utilisation are not
    assert sample["gpu_memory_percent"] is None and sample["gpu_utilization_percent"] is None


def test_a_gpu_whose_compute_capability_nvml_cannot_tell_is_left_out(monkeypatch):
    fake = _orin_nvml()
    fake.nvmlDeviceGetCudaComputeCapability = _not_supported
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert probe_gpus() == ((), "NVML found no GPU")


# --- which TensorRT onnxruntime's provider loads ---------------------------------------------------------


def _compile(source: str, out: Path, *flags: str) -> None:
    c_file = out.with_suffix(".c")
    c_file.write_text(source)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(out), str(c_file), *flags], check=True)


def _stub_provider(root: Path, major: int, version: int) -> Path:
    """A provider library linking libnvinfer.so.MAJOR, found on its RUNPATH ($ORIGIN/../trt) and answering
    `version`. Each test uses its own MAJOR: the loader hands back a soname it loaded before."""
    trt, capi = root / "trt", root / "capi"
    trt.mkdir(parents=True)
    capi.mkdir()
    soname = f"libnvinfer.so.{major}"
    _compile(f"int getInferLibVersion(void) {{ return {version}; }}", trt / soname, f"-Wl,-soname,{soname}")
    provider = capi / "libonnxruntime_providers_tensorrt.so"
    _compile(
        "extern int getInferLibVersion(void); int provider(void) { return getInferLibVersion(); }",
        provider,
        f"-L{trt}",
        f"-l:{soname}",
        "-Wl,--enable-new-dtags,-rpath,$ORIGIN/../trt",
    )
    return provider


needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs a C compiler for the stand-in libraries")


@needs_gcc
def test_the_tensorrt_version_is_the_one_the_provider_library_links(tmp_path):
    """sonames no real TensorRT uses (77, 78), so nothing installed here can answer in their place."""
    provider = _stub_provider(tmp_path, 77, 770102)
    newer = tmp_path / "other" / "libnvinfer.so.78"  # a newer TensorRT elsewhere must not be the answer
    newer.parent.mkdir()
    _compile("int getInferLibVersion(void) { return 780000; }", newer, "-Wl,-soname,libnvinfer.so.78")
    dynamic = read_dynamic(provider)
    assert dynamic is not None and "libnvinfer.so.77" in dynamic.needed and dynamic.search_path == ("$ORIGIN/../trt",)
    assert probe_tensorrt_version(provider) == "77.1.2"


@needs_gcc
def test_no_tensorrt_version_when_the_library_the_provider_links_is_absent(tmp_path):
    provider = _stub_provider(tmp_path, 79, 790000)
    shutil.rmtree(tmp_path / "trt")  # as on a host with onnxruntime-gpu and no TensorRT
    assert probe_tensorrt_version(provider) is None
    plain = tmp_path / "libplain.so"
    _compile("int nothing(void) { return 0; }", plain)
    assert probe_tensorrt_version(plain) is None  # a library that links no TensorRT
    (tmp_path / "text.so").write_text("not an ELF file")
    assert read_dynamic(tmp_path / "text.so") is None


# --- two onnxruntime builds side by side ----------------------------------------------------------------


def _fake_distribution(site: Path, name: str, version: str = "1.22.0", module: str = "onnxruntime") -> None:
    """An installed distribution's metadata, as pip writes it (the module's files themselves are not needed)."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "RECORD").write_text(f"{module}/__init__.py,,\n{module}/capi/_pybind_state.py,,\n")


def test_onnxruntime_gpu_beside_onnxruntime_is_named_and_blocks_the_gpu(monkeypatch, tmp_path):
    assert onnxruntime_conflict(onnxruntime_packages()) is None  # this machine: the CPU onnxruntime alone
    _fake_distribution(tmp_path, "onnxruntime-gpu")
    _fake_distribution(tmp_path, "onnxruntime-genai", "0.12.2", "onnxruntime_genai")  # another module: no conflict
    monkeypatch.syspath_prepend(str(tmp_path))
    packages = onnxruntime_packages()
    assert packages == ("onnxruntime", "onnxruntime-gpu")
    message = onnxruntime_conflict(packages)
    assert message is not None and "onnxruntime and onnxruntime-gpu are both installed" in message
    host = _gpu_host(onnxruntime_packages=packages)
    assert gpu_runtime_problems(host)[0] == message


def test_the_tensorrt_step_refuses_a_build_host_with_both_onnxruntime_builds(
    monkeypatch, tmp_path, tiny_llama, session_cache, lmpack_cli
):
    # the packages as found above; sys.path itself is left alone here, since the build imports modules that add to it
    monkeypatch.setattr("lmpack.steps.tensorrt.onnxruntime_packages", lambda: ("onnxruntime", "onnxruntime-gpu"))
    result = lmpack_cli(
        "build", tiny_llama, "--target", "a100", "--profile", "fp16-trt", "-o", tmp_path / "dist",
        "--cache-dir", session_cache,
    )  # fmt: skip
    assert result.exit_code != 0
    assert "cannot build a TensorRT engine here: onnxruntime and onnxruntime-gpu are both installed" in result.output


# --- providers for a variant without an engine ------------------------------------------------------------


def _gpu_host(**software) -> HostFacts:
    return HostFacts(
        arch="x86_64",
        isa=frozenset({"avx2", "fma"}),
        memory_bytes=64 * GIB,
        gpus=(GpuFacts(name="NVIDIA L4", compute_capability="8.9", memory_bytes=24 * GIB, free_memory_bytes=20 * GIB),),
        software=GpuSoftware(
            driver_version="550.54.15",
            cuda_driver_version="12.4",
            onnxruntime_version="1.22.0",
            onnxruntime_cuda_version="12.4",
            providers=(TRT, CUDA_EP, CPU_EP),  # onnxruntime-gpu lists TensorRT whether or not it is installed
            **software,
        ),
    )


def _variant(tmp_path: Path, providers: list[str]) -> Variant:
    return Variant(
        path=tmp_path,
        name="m-l4-fp16",
        task="text-generation",
        model_dir=tmp_path,
        onnx_path=tmp_path / "model.onnx",
        info={},
        meta={},
        config={},
        generation={},
        tokenizer_config={},
        chat_template=None,
        eos_token_ids=(),
        context_length=None,
        providers=providers,
    )


def test_a_gpu_variant_without_an_engine_runs_on_cuda_never_on_tensorrt(tmp_path, caplog):
    listed = [TRT, CUDA_EP, CPU_EP]  # a GPU target's list, as variant.json records it
    assert plain_providers(listed, _gpu_host()) == ([CUDA_EP, CPU_EP], None)
    assert plain_providers([CPU_EP], _gpu_host()) == ([CPU_EP], None)
    loaded = apply_plan(_variant(tmp_path, listed), None, None, _gpu_host(), need_bytes=GIB, free_gpu=lambda: None)
    assert loaded.providers == [CUDA_EP, CPU_EP]

    no_cuda = replace(_gpu_host(), software=replace(_gpu_host().software, providers=(CPU_EP,)))
    with caplog.at_level(logging.WARNING, logger="lmpack.engines"):
        loaded = apply_plan(_variant(tmp_path, listed), None, None, no_cuda)
    assert loaded.providers == [CPU_EP]
    (line,) = [r.getMessage() for r in caplog.records]
    assert "running on the CPU" in line and "no CUDA execution provider" in line


def test_doctor_warns_of_two_onnxruntime_builds_and_shows_shared_memory(llama_variant, lmpack_cli, monkeypatch):
    packages = ("onnxruntime", "onnxruntime-gpu")
    jetson = HostFacts(
        arch="x86_64",
        isa=frozenset({"avx2", "fma"}),
        memory_bytes=32 * GIB,
        gpus=(GpuFacts(name="Orin (nvgpu)", compute_capability="8.7", memory_bytes=32 * GIB, unified_memory=True),),
        software=GpuSoftware(onnxruntime_version="1.22.0", providers=(CPU_EP,), onnxruntime_packages=packages),
    )
    monkeypatch.setattr("lmpack.runtime.host.probe_host", lambda: jetson)
    result = lmpack_cli("doctor", llama_variant)
    assert result.exit_code == 0, result.output
    assert "Orin (nvgpu) (compute capability 8.7, 32.0 GiB shared with the CPU)" in result.stdout
    assert "warning: onnxruntime and onnxruntime-gpu are both installed" in result.stdout
