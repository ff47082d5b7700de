"""Graph rewrites of the quantize step, on small hand-made graphs run with onnxruntime."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lmpack.steps.onnx_graph import fuse_sibling_matmul_nbits, share_head_with_embedding


def quantized_siblings(bits: int, block: int, symmetric: bool = True):
    """X [2, 3, 64] feeds four MatMuls of 48, 80, 32 and 16 columns, quantized to MatMulNBits; the fourth's
    scales are also a graph output (something else reads them), so it must stay alone."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    rng = np.random.default_rng(0)
    widths = (48, 80, 32, 16)
    weights = [
        numpy_helper.from_array(rng.normal(size=(64, n)).astype(np.float32), f"w{i}") for i, n in enumerate(widths)
    ]
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"mm{i}") for i in range(len(widths))]
    outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(len(widths))]
    graph = helper.make_graph(
        nodes,
        "siblings",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 64])],
        outputs,
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=symmetric, accuracy_level=4)
    quantizer.process()
    model = quantizer.model.model
    shared = next(n for n in model.graph.node if n.output[0] == "y3").input[2]
    model.graph.node.append(helper.make_node("Identity", [shared], ["scales3"]))
    model.graph.output.append(helper.make_tensor_value_info("scales3", TensorProto.FLOAT, None))
    return model


def run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def test_siblings_become_one_matmul_and_a_split_with_the_same_outputs():
    x = np.random.default_rng(1).normal(size=(2, 3, 64)).astype(np.float32)
    for bits, block, symmetric in ((8, 32, True), (4, 16, True), (8, 32, False), (4, 16, False)):
        model = quantized_siblings(bits, block, symmetric)  # asymmetric: zero points are stacked with the scales
        before = run(model, x)
        assert fuse_sibling_matmul_nbits(model) == 2  # three nodes became one; the shared one stayed
        ops = [n.op_type for n in model.graph.node]
        assert ops.count("MatMulNBits") == 2 and ops.count("Split") == 1
        fused = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and "fused" in n.name)
        assert {a.name: a.i for a in fused.attribute}["N"] == 48 + 80 + 32
        after = run(model, x)
        for want, got in zip(before, after, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert fuse_sibling_matmul_nbits(model) == 0  # nothing left to merge


@pytest.mark.parametrize("hidden", [64, 48])  # 48: the last of two 32-wide blocks is half padding
def test_the_embedding_reads_the_8bit_heads_rows_whatever_the_blocks_padding(hidden):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    vocab = 40
    table = np.random.default_rng(1).normal(size=(vocab, hidden)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "input_ids"], ["hidden"], name="embed"),
            helper.make_node("MatMul", ["hidden", "table_t"], ["logits"], name="head"),
        ],
        "tied",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 5])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("hidden", TensorProto.FLOAT, None),
        ],
        initializer=[numpy_helper.from_array(table, "table"), numpy_helper.from_array(table.T.copy(), "table_t")],
    )
    quantizer = MatMulNBitsQuantizer(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]),
        bits=8,
        block_size=32,
        is_symmetric=True,
        accuracy_level=4,
    )
    quantizer.process()
    model = quantizer.model.model

    share_head_with_embedding(model, "embed")

    assert "table" not in {i.name for i in model.graph.initializer}  # the fp32 table is gone
    head = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    ids = np.array([[0, 3, 17, 39, 3]], dtype=np.int64)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rows = session.run(["hidden"], {"input_ids": ids})[0]
    weight = inits[head.input[1]][ids].astype(np.float32) - 128  # [1, 5, blocks, 32]
    expected = (weight * inits[head.input[2]][ids][..., None]).reshape(1, 5, -1)[..., :hidden]
    np.testing.assert_array_equal(rows, expected)
    assert np.abs(rows - table[ids]).max() <= np.abs(inits[head.input[2]]).max() / 2 + 1e-6
