"""The runtime's KV-buffer graphs (runtime/device_kv.py) ship as files: they must be what scripts/kv_ops.py writes,
and do what device_kv says, on the CPU as the device (the batched path is tested in test_batching.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from lmpack.runtime.device_kv import KV_OPS, DeviceKV, shape_of

SCRIPT = Path(__file__).parents[2] / "scripts" / "kv_ops.py"


def test_the_shipped_graphs_are_what_the_script_writes():
    pytest.importorskip("onnx")
    spec = importlib.util.spec_from_file_location("kv_ops", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    written = module.files()
    assert sorted(written) == sorted(p.name for p in KV_OPS.glob("*.onnx"))
    for name, data in written.items():
        assert (KV_OPS / name).read_bytes() == data, f"{name}: run scripts/kv_ops.py"


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_rows_are_gathered_kept_padded_and_stacked_on_the_device(dtype):
    import onnxruntime as ort

    ops = DeviceKV("cpu", ["CPUExecutionProvider"])
    source = np.arange(2 * 3 * 5 * 4).reshape(2, 3, 5, 4).astype(dtype)
    value = ort.OrtValue.ortvalue_from_numpy(source, "cpu", 0)
    resized = ops.resize(value, [1, 0], 3, 4, 6).numpy()
    assert resized.shape == (4, 3, 6, 4) and resized.dtype == dtype
    assert np.array_equal(resized[0, :, :3], source[1, :, :3]) and np.array_equal(resized[1, :, :3], source[0, :, :3])
    assert not resized[2:].any() and not resized[:, :, 3:].any()
    stacked = ops.stack(value, value)
    assert shape_of(stacked) == (4, 3, 5, 4) and np.array_equal(stacked.numpy()[2:], source)
    assert not ops.zeros((2, 3, 7, 4), dtype).numpy().any()
    uploaded = ops.upload(source[:1, :, :2], 2, 8).numpy()
    assert uploaded.shape == (2, 3, 8, 4) and np.array_equal(uploaded[0, :, :2], source[0, :, :2])
