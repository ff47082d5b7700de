"""What this host can run: CPU architecture and instruction sets, memory, NVIDIA GPUs.

Probing is kept apart from deciding (lmpack/runtime/select.py) so the decision is a pure function of
recorded facts: tests feed it a fake GPU host, an aarch64 host or a small-memory host, and
`lmpack doctor --json` prints the same facts the server decided on. NVML (nvidia-ml-py) is optional and
imported only inside `probe_gpus`: a CPU-only server needs neither the package nor a driver.
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("lmpack.host")

_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8": "aarch64"}
# aarch64 kernels name features differently from target files (asimd is NEON); both spellings are kept.
_ISA_ALIASES = {"asimd": "neon"}


@dataclass(frozen=True)
class GpuFacts:
    name: str
    compute_capability: str      # "8.0"
    memory_bytes: int
    vendor: str = "nvidia"

    def to_dict(self) -> dict[str, Any]:
        return {"vendor": self.vendor, "name": self.name, "compute_capability": self.compute_capability,
                "memory_bytes": self.memory_bytes}


@dataclass(frozen=True)
class HostFacts:
    """Recorded facts about one host; `gpu_note` says why there is no GPU when `gpus` is empty."""

    arch: str
    isa: frozenset[str]
    memory_bytes: int
    gpus: tuple[GpuFacts, ...] = ()
    gpu_note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "isa": sorted(self.isa), "memory_bytes": self.memory_bytes,
                "gpus": [g.to_dict() for g in self.gpus], "gpu_note": self.gpu_note}


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
        import pynvml
    except ImportError:
        return (), "nvidia-ml-py is not installed"
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...: a host without a usable GPU
        return (), f"NVML is not available: {exc}"
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            gpus.append(GpuFacts(name=name.decode() if isinstance(name, bytes) else str(name),
                                 compute_capability=f"{major}.{minor}",
                                 memory_bytes=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)))
        return tuple(gpus), "" if gpus else "NVML found no GPU"
    except Exception as exc:
        return (), f"NVML failed: {exc}"
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def probe_host() -> HostFacts:
    """The facts of the machine this process runs on."""
    gpus, note = probe_gpus()
    facts = HostFacts(arch=normalize_arch(platform.machine()), isa=probe_cpu_flags(), memory_bytes=probe_memory(),
                      gpus=gpus, gpu_note=note)
    log.debug("host facts: %s", facts.to_dict())
    return facts
