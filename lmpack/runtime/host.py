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

from lmpack.nvml import NvmlUnavailable, nvml, nvml_text, nvml_value
from lmpack.runtime.elf import read_dynamic

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
    unified_memory: bool = False  # shares the host's memory (Jetson): the memory figures are the host's

    def to_dict(self) -> dict[str, Any]:
        return {
            "vendor": self.vendor,
            "name": self.name,
            "compute_capability": self.compute_capability,
            "memory_bytes": self.memory_bytes,
            "free_memory_bytes": self.free_memory_bytes,
            "unified_memory": self.unified_memory,
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
    onnxruntime_packages: tuple[str, ...] = ()  # the distributions installing the module: one, or a conflict

    def to_dict(self) -> dict[str, Any]:
        return {
            "onnxruntime_packages": list(self.onnxruntime_packages),
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


def _gpu(pynvml: Any, index: int) -> GpuFacts | None:
    """One GPU's facts, each read on its own (nvml_value); None when even its compute capability is unknown.

    A GPU without NVML memory figures shares the host's memory (Jetson Orin's integrated GPU, where the
    query is "not supported"): its memory is the host's total and its free memory the host's available."""
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    capability = nvml_value(pynvml.nvmlDeviceGetCudaComputeCapability, handle)
    if capability is None:
        log.warning("NVML does not tell GPU %d's compute capability; it is left out", index)
        return None
    name = nvml_value(pynvml.nvmlDeviceGetName, handle)
    memory = nvml_value(pynvml.nvmlDeviceGetMemoryInfo, handle)
    unified = memory is None or not getattr(memory, "total", 0)
    if unified:
        import psutil

        host = psutil.virtual_memory()  # /proc/meminfo's MemTotal and MemAvailable, as probe_memory reads it
        total, free = host.total, host.available
    else:
        total, free = int(memory.total), getattr(memory, "free", None)
    return GpuFacts(
        name=nvml_text(name) if name is not None else f"NVIDIA GPU {index}",
        compute_capability=f"{capability[0]}.{capability[1]}",
        memory_bytes=int(total),
        free_memory_bytes=None if free is None else int(free),
        unified_memory=unified,
    )


def probe_gpus() -> tuple[tuple[GpuFacts, ...], str]:
    """NVIDIA GPUs via NVML, or () and the reason there are none (no package, no driver, no device)."""
    try:
        with nvml() as pynvml:
            found = (_gpu(pynvml, index) for index in range(pynvml.nvmlDeviceGetCount()))
            gpus = tuple(gpu for gpu in found if gpu is not None)
            return gpus, "" if gpus else "NVML found no GPU"
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


# onnxruntime-gpu's TensorRT provider, beside onnxruntime's own library; it links libnvinfer.so.MAJOR.
TENSORRT_PROVIDER_LIBRARY = "libonnxruntime_providers_tensorrt.so"


def tensorrt_provider_library() -> Path | None:
    """onnxruntime's TensorRT provider library where this onnxruntime has one (onnxruntime-gpu on Linux)."""
    try:
        import onnxruntime
    except ImportError:
        return None
    path = Path(onnxruntime.__file__).parent / "capi" / TENSORRT_PROVIDER_LIBRARY
    return path if path.is_file() else None


def probe_tensorrt_version(provider: Path | None = None) -> str | None:
    """The version of the TensorRT that onnxruntime's TensorRT provider loads; None where it has none.

    That TensorRT builds and runs the engines, so it is the one recorded and compared. It is found the way
    the dynamic loader finds it: the libnvinfer.so.N the provider library names (DT_NEEDED), looked for on
    the provider's RUNPATH and then the loader's own path. TensorRT's Python package, or another libnvinfer
    on the host, may be a different version and is not asked."""
    provider = provider or tensorrt_provider_library()
    dynamic = read_dynamic(provider) if provider else None
    if provider is None or dynamic is None:
        return None
    nvinfer = next((name for name in dynamic.needed if name.startswith("libnvinfer.so")), None)
    if nvinfer is None:
        return None
    import ctypes

    origin = str(provider.resolve().parent)
    places = [
        str(Path(d.replace("$ORIGIN", origin).replace("${ORIGIN}", origin)) / nvinfer) for d in dynamic.search_path
    ]
    for place in [*places, nvinfer]:
        try:
            library = ctypes.CDLL(place)
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


def onnxruntime_packages() -> tuple[str, ...]:
    """The installed distributions that each install the `onnxruntime` module, by name, sorted.

    onnxruntime and onnxruntime-gpu (and the other builds) write the same files, so with two installed the
    module is whichever was installed last, often the CPU one: no CUDA or TensorRT provider then. The build
    extra pulls the CPU onnxruntime, so a GPU build host that adds onnxruntime-gpu lands there easily."""
    import importlib.metadata as md

    names = set()
    for dist in md.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name != "onnxruntime" and not name.startswith("onnxruntime-"):
            continue
        if any(str(f).replace("\\", "/") == "onnxruntime/__init__.py" for f in dist.files or ()):
            names.add(name)
    return tuple(sorted(names))


def onnxruntime_conflict(packages: tuple[str, ...]) -> str | None:
    """The message for more than one onnxruntime build installed side by side; None for one or none."""
    if len(packages) < 2:
        return None
    return (
        f"{' and '.join(packages)} are both installed and overwrite each other's `onnxruntime` module, so "
        "the GPU providers may be missing; uninstall all of them and install onnxruntime-gpu alone "
        '(docs/gpu-targets.md, "The GPU build host")'
    )


def probe_software() -> GpuSoftware:
    driver, cuda_driver = probe_driver()
    ort_version, ort_cuda, providers = probe_onnxruntime()
    tensorrt = probe_tensorrt_version()
    return GpuSoftware(
        onnxruntime_packages=onnxruntime_packages(),
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
