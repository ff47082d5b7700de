"""What this host can run: CPU architecture and instruction sets, memory, NVIDIA GPUs, and the GPU software
(driver, onnxruntime and its execution providers, TensorRT).

Probing is kept apart from deciding (lmpack/runtime/select.py) so the decision is a pure function of
recorded facts: tests feed it a fake GPU host, an aarch64 host or a small-memory host, and
`lmpack doctor --json` prints the same facts the server decided on. NVML (nvidia-ml-py) is optional and
imported only inside `lmpack.nvml.nvml()`: a CPU-only server needs neither the package nor a driver.
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmpack.nvml import NvmlUnavailable, nvml, nvml_text

log = logging.getLogger("lmpack.host")

_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8": "aarch64"}
# aarch64 kernels name features differently from target files (asimd is NEON); both spellings are kept.
_ISA_ALIASES = {"asimd": "neon"}


@dataclass(frozen=True)
class GpuFacts:
    name: str
    compute_capability: str  # "8.0"
    memory_bytes: int
    vendor: str = "nvidia"
    free_memory_bytes: int | None = None  # at probe time; None when NVML did not say

    def to_dict(self) -> dict[str, Any]:
        return {
            "vendor": self.vendor,
            "name": self.name,
            "compute_capability": self.compute_capability,
            "memory_bytes": self.memory_bytes,
            "free_memory_bytes": self.free_memory_bytes,
        }


@dataclass(frozen=True)
class GpuSoftware:
    """The driver and the runtime libraries a GPU variant needs; None where absent or unknown.

    `cuda_driver_version` is the newest CUDA the driver supports (NVML); `onnxruntime_cuda_version` the
    CUDA onnxruntime-gpu was built for; `providers` what onnxruntime offers here, in its order.
    """

    driver_version: str | None = None
    cuda_driver_version: str | None = None
    onnxruntime_version: str | None = None
    onnxruntime_cuda_version: str | None = None
    tensorrt_version: str | None = None
    providers: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "driver_version": self.driver_version,
            "cuda_driver_version": self.cuda_driver_version,
            "onnxruntime_version": self.onnxruntime_version,
            "onnxruntime_cuda_version": self.onnxruntime_cuda_version,
            "tensorrt_version": self.tensorrt_version,
            "providers": list(self.providers),
        }


@dataclass(frozen=True)
class HostFacts:
    """Recorded facts about one host; `gpu_note` says why there is no GPU when `gpus` is empty."""

    arch: str
    isa: frozenset[str]
    memory_bytes: int
    gpus: tuple[GpuFacts, ...] = ()
    gpu_note: str = ""
    software: GpuSoftware = GpuSoftware()

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "isa": sorted(self.isa),
            "memory_bytes": self.memory_bytes,
            "gpus": [g.to_dict() for g in self.gpus],
            "gpu_note": self.gpu_note,
            "software": self.software.to_dict(),
        }


def parse_compute_capability(value: str) -> tuple[int, int]:
    """ "8.9" as (8, 9), for comparing compute capabilities."""
    major, _, minor = value.partition(".")
    return int(major), int(minor or 0)


def normalize_arch(machine: str) -> str:
    machine = machine.strip().lower()
    return _ARCH_ALIASES.get(machine, machine)


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """ISA flags from /proc/cpuinfo text: `flags` on x86, `Features` on ARM (first processor is enough)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags = {f.lower() for f in value.split()}
            return frozenset(flags | {_ISA_ALIASES[f] for f in flags if f in _ISA_ALIASES})
    return frozenset()


def probe_cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    try:
        return parse_cpu_flags(cpuinfo.read_text(errors="replace"))
    except OSError:  # not Linux: no flags known, so any ISA requirement is reported as unmet
        return frozenset()


def probe_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


def probe_gpus() -> tuple[tuple[GpuFacts, ...], str]:
    """NVIDIA GPUs via NVML, or () and the reason there are none (no package, no driver, no device)."""
    try:
        with nvml() as pynvml:
            gpus = []
            for index in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
                free = getattr(memory, "free", None)
                gpus.append(
                    GpuFacts(
                        name=nvml_text(pynvml.nvmlDeviceGetName(handle)),
                        compute_capability=f"{major}.{minor}",
                        memory_bytes=int(memory.total),
                        free_memory_bytes=None if free is None else int(free),
                    )
                )
            return tuple(gpus), "" if gpus else "NVML found no GPU"
    except NvmlUnavailable as exc:
        return (), str(exc) if exc.missing_package else f"NVML is not available: {exc}"
    except Exception as exc:
        return (), f"NVML failed: {exc}"


def probe_driver() -> tuple[str | None, str | None]:
    """(driver version, newest CUDA it supports as "12.4") through NVML; (None, None) without one."""
    try:
        with nvml() as pynvml:
            cuda = int(pynvml.nvmlSystemGetCudaDriverVersion())  # 12040 for CUDA 12.4
            return nvml_text(pynvml.nvmlSystemGetDriverVersion()), f"{cuda // 1000}.{cuda % 1000 // 10}"
    except Exception:  # NvmlUnavailable, or an NVML call failing
        return None, None


def decode_tensorrt_version(number: int) -> str:
    """getInferLibVersion()'s integer as "10.3.0": major*10000+minor*100+patch from TensorRT 10, *1000 before."""
    if number >= 10000:
        return f"{number // 10000}.{number % 10000 // 100}.{number % 100}"
    return f"{number // 1000}.{number % 1000 // 100}.{number % 100}"


# The TensorRT provider loads libnvinfer itself, so TensorRT's Python package is often absent on a server
# (JetPack installs the libraries system-wide); the library answers the version either way.
_NVINFER = ("libnvinfer.so.11", "libnvinfer.so.10", "libnvinfer.so.8", "libnvinfer.so")


def probe_tensorrt_version() -> str | None:
    """TensorRT's version from its Python package or, failing that, from libnvinfer; None without TensorRT."""
    try:
        import tensorrt

        return str(tensorrt.__version__)
    except Exception:  # ImportError, or a broken install that fails while loading its libraries
        pass
    import ctypes

    for name in _NVINFER:
        try:
            library = ctypes.CDLL(name)
            library.getInferLibVersion.restype = ctypes.c_int32
            return decode_tensorrt_version(int(library.getInferLibVersion()))
        except (OSError, AttributeError):
            continue
    return None


def probe_onnxruntime() -> tuple[str | None, str | None, tuple[str, ...]]:
    """(onnxruntime version, the CUDA version onnxruntime-gpu was built for, available providers)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None, None, ()
    try:
        from onnxruntime.capi import build_and_package_info as info

        cuda = getattr(info, "cuda_version", None) or None  # only onnxruntime-gpu's build records one
    except ImportError:
        cuda = None
    return str(ort.__version__), cuda, tuple(ort.get_available_providers())


def probe_software() -> GpuSoftware:
    driver, cuda_driver = probe_driver()
    ort_version, ort_cuda, providers = probe_onnxruntime()
    tensorrt = probe_tensorrt_version()
    return GpuSoftware(
        driver_version=driver,
        cuda_driver_version=cuda_driver,
        onnxruntime_version=ort_version,
        onnxruntime_cuda_version=ort_cuda,
        tensorrt_version=tensorrt,
        providers=providers,
    )


def probe_host() -> HostFacts:
    """The facts of the machine this process runs on."""
    gpus, note = probe_gpus()
    facts = HostFacts(
        arch=normalize_arch(platform.machine()),
        isa=probe_cpu_flags(),
        memory_bytes=probe_memory(),
        gpus=gpus,
        gpu_note=note,
        software=probe_software(),
    )
    log.debug("host facts: %s", facts.to_dict())
    return facts
