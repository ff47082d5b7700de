"""The KV cache's precision: a GroupQueryAttention graph rewritten to keep its past and present keys and values in
fp16, half the memory of each sequence's cache.

onnxruntime's GroupQueryAttention takes one element type for all its tensors (query, keys, values, the caches,
the rotary cos/sin tables and the output), and its CPU kernel runs in fp16 as well as fp32 (docs/serving.md, "KV
cache precision", has its speed). So each attention node gets its query (packed QKV) and any separate key and
value cast to fp16, its cos/sin tables stored in fp16, and its output cast back to fp32 for the projection that
follows; the graph's past_key_values.* inputs and present.* outputs become fp16, which the runtime reads from the
graph when it allocates the caches (runtime.sessions.NP_TYPES). Everything else stays as it was.
"""

from __future__ import annotations

import numpy as np

from lmpack.errors import StepError

GQA = "GroupQueryAttention"
# GroupQueryAttention's inputs: 0-2 query, key, value; 3-4 the past; 7-8 the rotary cos and sin tables.
_ACTIVATIONS, _PAST, _ROTARY = (0, 1, 2), (3, 4), (7, 8)


def kv_cache_fp16(model) -> int:
    """Rewrite every GroupQueryAttention of `model` (in place) to keep its KV cache in fp16; the count rewritten.
    A graph without GroupQueryAttention (optimum's export) cannot take it: StepError names the exporter that can."""
    from onnx import TensorProto, helper, numpy_helper

    from lmpack.steps.onnx_graph import drop_unused_initializers

    graph = model.graph
    if not any(node.op_type == GQA for node in graph.node):
        raise StepError(
            "an fp16 KV cache needs a graph with GroupQueryAttention (onnxruntime-genai's exporter); this "
            "graph has none",
        )
    initializers = {init.name: init for init in graph.initializer}
    halved: dict[str, str] = {}  # an fp32 rotary table -> its fp16 copy, shared by every layer that reads it
    caches: set[str] = set()
    order, rewritten = [], 0  # the node list with each attention's casts around it, in topological order
    for node in graph.node:
        if node.op_type != GQA:
            order.append(node)
            continue
        rewritten += 1
        for index in _given(node, _ACTIVATIONS):
            cast = f"{node.input[index]}/lmpack_fp16"
            order.append(helper.make_node("Cast", [node.input[index]], [cast], to=TensorProto.FLOAT16))
            node.input[index] = cast
        for index in _given(node, _ROTARY):
            name = node.input[index]
            if name in initializers:
                if name not in halved:
                    table = numpy_helper.to_array(initializers[name]).astype(np.float16)
                    graph.initializer.append(numpy_helper.from_array(table, f"{name}_fp16"))
                    halved[name] = f"{name}_fp16"
                node.input[index] = halved[name]
        caches.update(node.input[index] for index in _given(node, _PAST))
        caches.update(name for name in node.output[1:3] if name)
        output = node.output[0]
        node.output[0] = f"{output}/lmpack_fp16"
        order += [node, helper.make_node("Cast", [node.output[0]], [output], to=TensorProto.FLOAT)]
    del graph.node[:]
    graph.node.extend(order)
    for value in [*graph.input, *graph.output]:
        if value.name in caches:
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
    drop_unused_initializers(model)  # the fp32 rotary tables, now that every layer reads the fp16 copies
    return rewritten


def _given(node, indices: tuple[int, ...]) -> list[int]:
    """Those of `indices` where `node` has an input (an optional one left out is missing or empty)."""
    return [index for index in indices if index < len(node.input) and node.input[index]]
