"""4-bit MatMuls that keep each block's float minimum: MatMulNBits with integer zero points, plus a per-block
offset added back through a small MatMul of the input's block sums (the quantize step's `block_offsets`).

A Q4_1 or Q4_K block holds d * q + m with a float minimum m. MatMulNBits computes d * (q - zp) with a 4-bit
integer zp, which puts every weight of the block off by c = m + zp * d (half a step at most, for a block
spanning zero); its float zero points would hold m exactly but leave its int8 kernel (several times slower).
So the block keeps the integer zero point and c is added back: x @ W = MatMulNBits(x) + blocksums(x) @ C,
where blocksums(x) [.., K / block] sums x over each block's inputs and C [K / block, N] holds each block's c.
The sums are made once per input, and the MatMuls that read the same input share one offsets MatMul (its
columns split after). docs/build.md, "The int4 profile", has the measurements. Quantizing: q counts steps up
from the block's minimum (min-max, 15 steps), so a source already on such a grid (a Q4_1 GGUF) is kept exactly.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np


def quantize_with_offsets(model, names: set[str], block_size: int, accuracy_level: int) -> list[str]:
    """Replace the MatMuls `names` of `model` (in place; weights as initializers [K, N]) with 4-bit MatMulNBits and
    the offset correction; returns the names of the offset MatMuls, which other quantizer passes must leave alone."""
    from onnx import helper, numpy_helper

    from lmpack.steps.onnx_graph import drop_unused_initializers

    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    by_input: dict[str, list[Any]] = defaultdict(list)
    for node in graph.node:
        if node.name in names and node.op_type == "MatMul" and node.input[1] in weights:
            by_input[node.input[0]].append(node)
    replaced: dict[int, list[Any]] = {}  # id of a MatMul -> the nodes in its place
    offset_matmuls = []
    for index, (source, group) in enumerate(by_input.items()):
        arrays = [numpy_helper.to_array(weights[node.input[1]]) for node in group]
        if any(a.shape[0] != arrays[0].shape[0] for a in arrays) or arrays[0].shape[0] % block_size:
            continue  # a ragged last block would need its own sums; such MatMuls stay for the plain quantizer
        quantized = [
            _quantized(graph, node, weight, block_size, accuracy_level)
            for node, weight in zip(group, arrays, strict=True)
        ]
        prefix = f"/lmpack_offsets/{index}"
        offsets = [offset.astype(arrays[0].dtype) for _, offset in quantized]
        corrections = [f"{node.output[0]}/lmpack_offset" for node in group]
        replaced[id(group[0])] = _offsets_nodes(graph, prefix, source, offsets, corrections, block_size)
        offset_matmuls.append(f"{prefix}/MatMul")
        for node, (nodes, _) in zip(group, quantized, strict=True):
            replaced[id(node)] = replaced.get(id(node), []) + nodes
    nodes = [made for node in graph.node for made in replaced.get(id(node), [node])]
    del graph.node[:]
    graph.node.extend(nodes)
    drop_unused_initializers(model)  # the replaced MatMuls' fp32 weights
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return offset_matmuls


def _offsets_nodes(graph, prefix: str, source: str, offsets: list[np.ndarray], corrections: list[str], block_size: int):
    """The nodes (and initializers) that make `corrections`, one per MatMul reading `source`: the input's sums
    over each block, times the offsets of all of them at once, split by MatMul."""
    from onnx import helper, numpy_helper

    k = offsets[0].shape[0] * block_size
    shape, axis, blocks, sums, table = (
        f"{prefix}/{n}" for n in ("blocks_shape", "last_axis", "blocks", "block_sums", "offsets")
    )
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([0, 0, k // block_size, block_size], np.int64), shape),
            numpy_helper.from_array(np.array([-1], np.int64), axis),
            numpy_helper.from_array(np.concatenate(offsets, axis=1), table),
        ]
    )
    made = [
        helper.make_node("Reshape", [source, shape], [blocks], name=f"{prefix}/Reshape"),
        helper.make_node("ReduceSum", [blocks, axis], [sums], name=f"{prefix}/ReduceSum", keepdims=0),
    ]
    if len(corrections) == 1:
        return [*made, helper.make_node("MatMul", [sums, table], corrections, name=f"{prefix}/MatMul")]
    joined, widths = f"{prefix}/corrections", f"{prefix}/widths"
    graph.initializer.append(numpy_helper.from_array(np.array([o.shape[1] for o in offsets], np.int64), widths))
    return [
        *made,
        helper.make_node("MatMul", [sums, table], [joined], name=f"{prefix}/MatMul"),
        helper.make_node("Split", [joined, widths], corrections, name=f"{prefix}/Split", axis=-1),
    ]


def _quantized(graph, node, weight: np.ndarray, block_size: int, accuracy_level: int) -> tuple[list, np.ndarray]:
    """The MatMulNBits and Add in `node`'s place (its weights added to `graph`), and its offsets [K / block, N]."""
    from onnx import helper, numpy_helper

    packed, scales, zeros, offset = quantize_blocks(weight, block_size)
    k, n = weight.shape
    name = node.name.strip("/").replace("/", "_")
    graph.initializer.extend(
        [
            numpy_helper.from_array(packed, f"{name}_q4"),
            numpy_helper.from_array(scales.astype(weight.dtype), f"{name}_scales"),
            numpy_helper.from_array(zeros, f"{name}_zero_points"),
        ]
    )
    product, output = f"{node.output[0]}/lmpack_nbits", node.output[0]
    nodes = [
        helper.make_node(
            "MatMulNBits",
            [node.input[0], f"{name}_q4", f"{name}_scales", f"{name}_zero_points"],
            [product],
            name=f"{node.name}_Q4",
            domain="com.microsoft",
            K=k,
            N=n,
            bits=4,
            block_size=block_size,
            accuracy_level=accuracy_level,
        ),
        helper.make_node("Add", [product, f"{output}/lmpack_offset"], [output], name=f"{node.name}_offset"),
    ]
    return nodes, offset


def quantize_blocks(weight: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MatMulNBits' 4-bit layout of `weight` [K, N] (K a multiple of `block_size`): packed weights [N, blocks,
    block_size / 2], scales [N * blocks], packed zero points, and the offsets [blocks, N] that put each block's
    minimum back (dequantized: scale * (q - zero) + offset)."""
    k, n = weight.shape
    blocks = k // block_size
    b = weight.T.astype(np.float64).reshape(n, blocks, block_size)
    low, high = b.min(-1, keepdims=True), b.max(-1, keepdims=True)
    step = np.where(high > low, (high - low) / 15, 1.0)
    zero = np.clip(np.round(-low / step), 0, 15)
    q = np.round((b - low) / step).astype(np.uint8)  # steps up from the block's minimum: 0..15
    offset = (low + zero * step).reshape(n, blocks).T
    zeros = zero.reshape(n, blocks).astype(np.uint8)
    if blocks % 2:
        zeros = np.concatenate([zeros, np.zeros((n, 1), np.uint8)], axis=1)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    packed_zeros = (zeros[:, 0::2] | (zeros[:, 1::2] << 4)).reshape(-1)
    return packed, step.reshape(-1), packed_zeros, offset
