"""KV buffers in the device's memory for right-padded (GroupQueryAttention) graphs run on a GPU provider.

On the CPU the runtime keeps each sequence's (or batch's) past in numpy buffers, bound as the past input and the
present output at once so the graph writes each new key in place (sessions.InPlaceBinding). On a GPU those
buffers must live in the GPU's memory, or onnxruntime copies the whole cache to the device and back every step.
Here they are OrtValues allocated on the device: each step binds them by address with the batch's current shape
(the first `size` rows of a buffer with spare rows are a contiguous prefix of it), and the rare reshaping, when
a sequence joins or leaves a batch or the buffers grow, is done on the device too, by two tiny graphs run on the
session's own provider (gather rows, keep the first positions, pad with zeros; stack two batches). Only the
logits of the last position come back to the host.

The same code runs with the CPU as the device, which is how it is tested on machines without a GPU
(tests/runtime/test_batching.py); with "cuda" it has never run (docs/gpu-targets.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# The two graphs, written by scripts/kv_ops.py (the runtime has no onnx package to write them with): resize_T
# gathers rows, keeps the first positions and pads with zeros; stack_T concatenates two batches' rows.
KV_OPS = Path(__file__).resolve().parent / "kv_ops"
_TYPE_NAMES = {np.dtype(np.float32): "fp32", np.dtype(np.float16): "fp16"}


class DeviceKV:
    """Allocate, reshape and read back KV buffers on `device` ("cuda" or "cpu"), with `providers`' kernels."""

    def __init__(self, device: str, providers: Sequence[Any]):
        self.device = device
        self.providers = list(providers)
        self._sessions: dict[tuple[str, np.dtype], Any] = {}

    def _session(self, kind: str, dtype: np.dtype):
        key = (kind, np.dtype(dtype))
        if key not in self._sessions:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.log_severity_level = 3
            graph = KV_OPS / f"{kind}_{_TYPE_NAMES[np.dtype(dtype)]}.onnx"
            self._sessions[key] = ort.InferenceSession(str(graph), options, providers=self.providers)
        return self._sessions[key]

    def _run(self, kind: str, dtype: np.dtype, values: dict[str, Any], host: dict[str, np.ndarray]):
        session = self._session(kind, dtype)
        binding = session.io_binding()
        for name, value in values.items():
            binding.bind_ortvalue_input(name, value)
        for name, array in host.items():
            binding.bind_cpu_input(name, array)
        binding.bind_output("out", self.device)
        session.run_with_iobinding(binding)
        return binding.get_outputs()[0]

    def zeros(self, shape: tuple[int, ...], dtype: np.dtype):
        """A zeroed buffer on the device (a padded copy of nothing, so no host buffer of its size is made)."""
        import onnxruntime as ort

        empty = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, shape[1], 1, shape[3]), dtype), self.device, 0)
        return self.resize(empty, [], 0, shape[0], shape[2])

    def resize(self, src, rows: Sequence[int], keep: int, out_rows: int, out_positions: int):
        """A new buffer [out_rows, heads, out_positions, head_dim] whose first rows are `src`'s `rows`, each with
        its first `keep` positions, zeros elsewhere."""
        taken = np.asarray(list(rows), dtype=np.int64)
        pads = np.array([0, 0, 0, 0, out_rows - len(taken), 0, out_positions - keep, 0], dtype=np.int64)
        host = {"rows": taken, "keep": np.array([keep], np.int64), "pads": pads}
        return self._run("resize", dtype_of(src), {"src": src}, host)

    def stack(self, a, b):
        """`a`'s rows, then `b`'s (the same heads, positions and head size)."""
        return self._run("stack", dtype_of(a), {"a": a, "b": b}, {})

    def upload(self, array: np.ndarray, out_rows: int, out_positions: int):
        """A host array [rows, heads, positions, head_dim] (a prefix-cache hit's) on the device, padded."""
        import onnxruntime as ort

        value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)
        return self.resize(value, range(array.shape[0]), array.shape[2], out_rows, out_positions)


def dtype_of(value) -> np.dtype:
    """An OrtValue's element type (fp16 or fp32, the KV caches' types)."""
    name = value.data_type()  # "tensor(float16)", "tensor(float)"
    return np.dtype(np.float16) if "float16" in name else np.dtype(np.float32)


def shape_of(value) -> tuple[int, ...]:
    """An OrtValue's or an array's shape."""
    return tuple(value.shape()) if callable(getattr(value, "shape", None)) else tuple(value.shape)
