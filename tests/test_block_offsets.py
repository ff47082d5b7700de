"""The int4 block offsets: MatMulNBits with integer zero points plus the per-block offset correction computes a
weight already on a 4-bit grid with a float minimum per block (a Q4_1 GGUF's) exactly, where MatMulNBits alone
cannot; the quantize step wires it in beside the 8-bit head and sensitive layers.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lmpack.steps.block_offsets import quantize_blocks, quantize_with_offsets

K, N, BLOCK = 128, 48, 32


def _q4_1_weight(seed: int = 0) -> np.ndarray:
    """[K, N] weights each block of BLOCK inputs holds as d * q + m, q in 0..15, with float d and m (Q4_1)."""
    rng = np.random.default_rng(seed)
    d = rng.uniform(0.01, 0.05, size=(K // BLOCK, 1, N)).astype(np.float32)
    m = (-d * rng.uniform(2.0, 13.0, size=d.shape)).astype(np.float32)  # blocks spanning zero, as weights do
    q = rng.integers(0, 16, size=(K // BLOCK, BLOCK, N)).astype(np.float32)
    q[:, 0], q[:, 1] = 0, 15  # every block spans its whole grid, as a Q4_1 block's min and max do
    return (d * q + m).reshape(K, N)


def _matmuls(weights: list[np.ndarray]) -> onnx.ModelProto:
    """x [1, 3, K] -> one MatMul per weight, all reading x (siblings, like gate and up projections)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, K])
    outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(len(weights))]
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"/mm{i}/MatMul") for i in range(len(weights))]
    inits = [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)]
    graph = helper.make_graph(nodes, "g", [x], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def test_a_q4_1_grid_is_kept_exactly_with_the_offsets():
    weight = _q4_1_weight()
    packed, scales, zeros, offset = quantize_blocks(weight, BLOCK)
    q = np.stack([packed & 15, packed >> 4], axis=-1).reshape(N, K // BLOCK, BLOCK).astype(np.float64)
    zero = np.stack([zeros & 15, zeros >> 4], axis=-1).reshape(N, -1)[:, : K // BLOCK]
    step = scales.reshape(N, K // BLOCK, 1)
    dequantized = step * (q - zero[..., None]) + offset.T[..., None]
    assert np.abs(dequantized.reshape(N, K).T - weight).max() < 1e-6
    # a block spanning zero has its zero point on the grid: the offset is what its rounding misses, half a step
    assert (np.abs(offset) <= step[..., 0].T / 2 + 1e-7).all()


@pytest.mark.parametrize("siblings", [1, 3])
def test_the_graph_computes_x_at_w_with_one_offsets_matmul_per_input(siblings):
    weights = [_q4_1_weight(seed) for seed in range(siblings)]
    x = np.random.default_rng(9).normal(size=(1, 3, K)).astype(np.float32)
    exact = [x @ w for w in weights]
    model = _matmuls(weights)
    offsets = quantize_with_offsets(model, {f"/mm{i}/MatMul" for i in range(siblings)}, BLOCK, accuracy_level=1)
    ops = [n.op_type for n in model.graph.node]
    assert len(offsets) == 1 and ops.count("MatMul") == 1 and ops.count("ReduceSum") == 1  # shared by the siblings
    assert ops.count("MatMulNBits") == siblings
    for got, want in zip(_run(model, x), exact, strict=True):
        assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()
    # without the offsets (MatMulNBits with integer zero points alone) the same weights are off by far more
    plain = _matmuls(weights)
    for node in plain.graph.node:
        node.name = node.name + "_plain"
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(plain, bits=4, block_size=BLOCK, is_symmetric=False, accuracy_level=1)
    quantizer.process()
    error = max(np.abs(g - w).max() for g, w in zip(_run(quantizer.model.model, x), exact, strict=True))
    assert error > 100 * 1e-4 * max(np.abs(w).max() for w in exact)


def test_the_int4_profile_keeps_block_offsets_on_its_4_bit_layers_only(tiny_llama, session_cache, tmp_path):
    """The shipped int4 profile: the 4-bit layers get their offsets, the 8-bit head and sensitive layers (and the
    offsets' own MatMuls) do not, and the report counts them."""
    from lmpack import api

    built = api.build(str(tiny_llama), target="cpu-x86", profile="int4", output_dir=tmp_path, cache_dir=session_cache)
    report = json.loads((built.variant_dir / "report.json").read_text())
    model = onnx.load(str(built.variant_dir / "model" / "model.onnx"), load_external_data=False)
    nodes = model.graph.node
    offsets = [n for n in nodes if n.op_type == "MatMul" and n.name.startswith("/lmpack_offsets/")]
    assert len(offsets) >= 2 * 4  # per layer at least the MLP's input and the attention output's
    assert [n for n in nodes if n.op_type == "MatMul"] == offsets  # everything else is MatMulNBits
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in nodes if n.op_type == "MatMulNBits"}
    corrected = {n.name for n in nodes if n.op_type == "MatMulNBits" and n.output[0].endswith("/lmpack_nbits")}
    assert corrected and {bits[name] for name in corrected} == {4}
    assert {name for name, b in bits.items() if b == 8}  # the head and the sensitive layers, without offsets
    quantize = next(s for s in report["steps"] if s["step"] == "quantize")
    assert quantize["metrics"]["block_offset_matmuls"] == len(offsets)
    info = json.loads((built.variant_dir / "model" / "lmpack-model.json").read_text())
    assert info["quantization"]["block_offsets"] is True
    assert report["quality"]["gate"] == "passed"
