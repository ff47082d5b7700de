"""Half precision for GPU targets: the conversion, with the nodes whose values overflow fp16 kept in fp32, and the
range check that lets a quality gate running on the CPU see an overflow a GPU would hit.

fp16 holds magnitudes up to 65504. A normalization's mean of squares passes that as soon as the hidden state
passes 256, which families with large activations do (docs/gpu-targets.md, "fp16"). So each RMSNorm's chain
from the square to the reciprocal square root stays fp32; its output, a scale near 1/|x|, is safe in fp16.

The converter is onnxruntime's. It casts each blocked node's output back to fp16 and the next blocked
node's input up again, so the square would still overflow between the Pow and the ReduceMean; those cast
pairs are then removed, and a blocked chain stays fp32 from end to end. onnxconverter-common's converter
keeps such chains whole by itself, but (1.16) leaves a Cast node's target type at fp32 while typing its
output fp16, which onnxruntime refuses to load, and transformers' RMSNorm starts with such a Cast.

The gate cannot see an overflow by running the fp16 graph on the CPU: onnxruntime's CPU provider computes
the nodes it has no fp16 kernel for (these among them) in fp32. The range check runs the fp32 graph instead
and reads every tensor the fp16 graph computes in half precision: a value beyond fp16's range there is a
value a GPU would turn into infinity.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from lmpack.steps.onnx_graph import consumer_map, save_model

FP16_MAX = 65504.0
# Attention masks are built from float32's lowest value (about -3.4e38) in fp32 graphs and from fp16's in the
# converted graph; values this large are such masks, not overflows.
_MASK_MAGNITUDE = 1e30
# The ops between a normalization's square and its reciprocal square root (transformers' RMSNorm as exported).
_NORM_CHAIN = ("ReduceMean", "Add", "Sqrt", "Reciprocal", "Div")
_NAMES_PER_RUN = 64  # tensors read per run of the fp32 graph: bounds the memory the check holds at once


def overflow_prone_nodes(model) -> list[str]:
    """Names of the nodes from each square (Pow(x, 2) or Mul(x, x)) through the chain that makes a normalization's
    reciprocal square root: the values there are squares of the hidden state."""
    constants = _scalar_constants(model)
    consumers = consumer_map(model.graph)
    blocked = []
    for node in model.graph.node:
        square = (node.op_type == "Pow" and constants.get(node.input[1]) == 2.0) or (
            node.op_type == "Mul" and len(node.input) == 2 and node.input[0] == node.input[1]
        )
        if not square:
            continue
        chain, current = [node], node
        while len(after := consumers[current.output[0]]) == 1 and after[0].op_type in _NORM_CHAIN:
            current = after[0]
            chain.append(current)
        if len(chain) > 1:  # a square alone (not feeding a mean) is some other computation, left as it is
            blocked += [n.name for n in chain]
    return blocked


def _scalar_constants(model) -> dict[str, float]:
    from onnx import numpy_helper

    values = {}
    for init in model.graph.initializer:
        if not init.dims or int(np.prod(init.dims)) == 1:
            values[init.name] = float(numpy_helper.to_array(init).reshape(-1)[0])
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            array = numpy_helper.to_array(node.attribute[0].t)
            if array.size == 1:
                values[node.output[0]] = float(array.reshape(-1)[0])
    return values


def convert(src: Path, dst: Path) -> dict[str, Any]:
    """`src` (an fp32 graph with external weights) as fp16, inputs and outputs still fp32, overflow-prone
    normalization nodes fp32; what was kept in fp32, for the report."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # Shape inference (which the converter needs to type every tensor) on the graph without its weights, so a
    # model over protobuf's 2 GB limit is inferred too; then the weights, for the converter to halve.
    model = onnx.shape_inference.infer_shapes(onnx.load(str(src), load_external_data=False))
    load_external_data_for_model(model, str(src.parent))
    blocked = overflow_prone_nodes(model)
    model = convert_float_to_float16(model, keep_io_types=True, node_block_list=blocked, disable_shape_infer=True)
    joined = join_fp32_chains(model)
    save_model(model, dst)
    return {"fp32_nodes": len(blocked), "fp16_round_trips_removed": joined}


def join_fp32_chains(model) -> int:
    """Remove each Cast to fp16 whose output only goes through Casts back to fp32 (the converter's round trip
    between two blocked nodes): the fp32 value goes on as it is. The count of round trips removed."""
    import onnx

    half, single = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    graph = model.graph
    consumers = consumer_map(graph)
    outputs = {o.name for o in graph.output}

    def casts_to(node, to: int) -> bool:
        return node.op_type == "Cast" and any(a.name == "to" and a.i == to for a in node.attribute)

    removed, renamed = set(), {}
    for node in graph.node:
        after = consumers[node.output[0]] if node.output else []
        if not casts_to(node, half) or not after or node.output[0] in outputs:
            continue
        if not all(casts_to(c, single) and c.output[0] not in outputs for c in after):
            continue
        removed.add(id(node))
        for back in after:
            removed.add(id(back))
            renamed[back.output[0]] = node.input[0]
    kept = [n for n in graph.node if id(n) not in removed]
    for node in kept:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    del graph.node[:]
    graph.node.extend(kept)
    produced = {o for node in kept for o in node.output}
    stale = [v for v in graph.value_info if v.name not in produced]
    for value in stale:  # the types of the tensors removed with the casts
        graph.value_info.remove(value)
    return len(renamed)


def half_tensors(fp16_model_path: Path) -> list[str]:
    """The tensors the fp16 graph computes in half precision (its typed float16 values)."""
    import onnx

    model = onnx.load(str(fp16_model_path), load_external_data=False)
    half = onnx.TensorProto.FLOAT16
    produced = {o for node in model.graph.node for o in node.output}
    return [v.name for v in model.graph.value_info if v.type.tensor_type.elem_type == half and v.name in produced]


def range_check(
    fp32_model_path: Path,
    fp16_model_path: Path,
    feeds: Iterable[Any],
    run: Callable[[bytes, Path, list[str], list[Any]], list[dict[str, float]]],
) -> dict[str, Any]:
    """The largest magnitude each fp16 tensor reaches when the fp32 graph runs `feeds`; the tensors beyond fp16.

    `run(graph, weights_dir, names, feeds)` runs a serialized copy of the fp32 graph that outputs `names`, on the
    weights in `weights_dir`, and returns per feed each name's largest magnitude (largest_magnitude): the
    validate step passes its session runner."""
    import onnx

    model = onnx.load(str(fp32_model_path), load_external_data=False)
    produced = {o for node in model.graph.node for o in node.output}
    outputs = {o.name for o in model.graph.output}
    names = [n for n in half_tensors(fp16_model_path) if n in produced and n not in outputs]
    feeds = list(feeds)
    largest: dict[str, float] = {}
    for start in range(0, len(names), _NAMES_PER_RUN):
        chunk = names[start : start + _NAMES_PER_RUN]
        for found in run(_with_outputs(model, chunk), fp32_model_path.parent, chunk, feeds):
            for name, value in found.items():
                largest[name] = max(largest.get(name, 0.0), value)
    beyond = sorted((n for n, v in largest.items() if v > FP16_MAX), key=lambda n: -largest[n])
    worst = max(largest, key=largest.__getitem__, default=None)
    return {
        "tensors": len(names),
        "max_abs": largest[worst] if worst else 0.0,
        "worst": worst,
        "beyond_fp16": [{"tensor": n, "max_abs": largest[n]} for n in beyond[:10]],
        "beyond_fp16_count": len(beyond),
    }


def _with_outputs(model, names: list[str]) -> bytes:
    """The fp32 graph (weights left external) serialized with `names` as extra outputs."""
    import onnx

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    return probe.SerializeToString()


def largest_magnitude(value: np.ndarray) -> float:
    """The largest finite magnitude in `value` that is not a mask value; 0.0 when there is none."""
    magnitude = np.abs(value.astype(np.float32, copy=False))
    usable = magnitude[np.isfinite(magnitude) & (magnitude < _MASK_MAGNITUDE)]
    return float(usable.max()) if usable.size else 0.0
