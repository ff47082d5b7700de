"""The one stand-in for nvidia-ml-py's pynvml: a module answering as it does on an A100 unless told otherwise
(`fake_nvml(nvmlDeviceGetName=lambda h: "NVIDIA L4", ...)`). Tests install it with
monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(...))."""

from __future__ import annotations

import types

GIB = 1 << 30


def fake_nvml(**answers) -> types.SimpleNamespace:
    defaults = dict(
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetCudaComputeCapability=lambda h: (8, 0),
        nvmlDeviceGetName=lambda h: b"NVIDIA A100",
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=40 * GIB),
        nvmlSystemGetDriverVersion=lambda: b"550.54.15",
        nvmlSystemGetCudaDriverVersion=lambda: 12040,
        NVML_TEMPERATURE_GPU=0,
        NVML_MEMORY_ERROR_TYPE_UNCORRECTED=1,
        NVML_VOLATILE_ECC=0,
    )
    return types.SimpleNamespace(**{**defaults, **answers})
