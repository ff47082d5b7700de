"""Start and stop NVML (nvidia-ml-py) in one place, for the runtime's host probes and the agent's GPU sampling.

nvidia-ml-py is optional: it is imported only when a block asks for NVML, and a host without the package,
the driver or a GPU gets NvmlUnavailable with the reason instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any


class NvmlUnavailable(Exception):
    """No NVML here: nvidia-ml-py is missing (`missing_package`), or NVML would not start (no driver, no GPU)."""

    def __init__(self, cause: str, *, missing_package: bool):
        super().__init__(cause)
        self.missing_package = missing_package


@contextlib.contextmanager
def nvml() -> Iterator[Any]:
    """pynvml, initialised for the block and shut down after it; NvmlUnavailable when there is none."""
    try:
        import pynvml
    except ImportError as exc:
        raise NvmlUnavailable("nvidia-ml-py is not installed", missing_package=True) from exc
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...: a host without a usable GPU
        raise NvmlUnavailable(str(exc), missing_package=False) from exc
    try:
        yield pynvml
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def nvml_value(call: Callable[..., Any], *args: Any) -> Any:
    """One NVML query, or None where this device does not answer it.

    Facts are read one at a time because devices differ in what they answer: Jetson's integrated GPU
    raises NVMLError_NotSupported for memory and utilisation queries while naming itself and its compute
    capability, and consumer GPUs have no ECC counters. One failing query must not hide the others."""
    try:
        return call(*args)
    except Exception:  # pynvml.NVMLError and its NotSupported / Unknown subclasses
        return None


def nvml_text(value: Any) -> str:
    """NVML's strings: bytes from older nvidia-ml-py versions, str from newer ones."""
    return value.decode() if isinstance(value, bytes) else str(value)
