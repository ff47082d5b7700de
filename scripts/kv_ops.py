#!/usr/bin/env python3
"""Write the runtime's two KV-buffer graphs (lmpack/runtime/device_kv.py) into lmpack/runtime/kv_ops/.

    .venv/bin/python scripts/kv_ops.py

The runtime has onnxruntime but not the onnx package, so these few-node graphs ship as files, written here with
onnx's helpers; tests/runtime/test_device_kv.py checks the shipped files are byte for byte what this writes.
resize_T: src [rows, heads, positions, head_dim], rows [k], keep [1], pads [8] -> Gather(src, rows) along the
rows, its first `keep` positions, zero-padded by `pads`. stack_T: a, b -> Concat along the rows.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "lmpack" / "runtime" / "kv_ops"
TYPES = {"fp32": np.float32, "fp16": np.float16}


def graph(kind: str, dtype) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    element = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    kv = ["rows", "heads", "positions", "head_dim"]
    if kind == "stack":
        inputs = [helper.make_tensor_value_info(n, element, kv) for n in ("a", "b")]
        nodes = [helper.make_node("Concat", ["a", "b"], ["out"], axis=0)]
        initializers = []
    else:
        inputs = [
            helper.make_tensor_value_info("src", element, kv),
            helper.make_tensor_value_info("rows", TensorProto.INT64, ["taken"]),
            helper.make_tensor_value_info("keep", TensorProto.INT64, [1]),
            helper.make_tensor_value_info("pads", TensorProto.INT64, [8]),
        ]
        initializers = [
            numpy_helper.from_array(np.zeros(1, np.int64), "start"),
            numpy_helper.from_array(np.array([2], np.int64), "axis"),
            numpy_helper.from_array(np.zeros((), dtype), "zero"),
        ]
        nodes = [
            helper.make_node("Gather", ["src", "rows"], ["taken"], axis=0),
            helper.make_node("Slice", ["taken", "start", "keep", "axis"], ["kept"]),
            helper.make_node("Pad", ["kept", "pads", "zero"], ["out"]),
        ]
    output = helper.make_tensor_value_info("out", element, None)
    body = helper.make_graph(nodes, f"lmpack_kv_{kind}", inputs, [output], initializers)
    model = helper.make_model(body, opset_imports=[helper.make_opsetid("", 18)], ir_version=8, producer_name="lmpack")
    return model.SerializeToString()


def files() -> dict[str, bytes]:
    return {f"{kind}_{name}.onnx": graph(kind, dtype) for kind in ("resize", "stack") for name, dtype in TYPES.items()}


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, data in files().items():
        (OUT / name).write_bytes(data)
        print(f"{OUT / name}: {len(data)} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
