"""Small ONNX graph rewrites the quantizers need, and load/save with the weights in an external data file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmpack.runtime.sessions import LOGITS_TO_KEEP  # the runtime feeds the input keep_last_logits adds


def load_model(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=True)


def save_model(model, path: Path) -> None:
    """Write `model` as PATH (the graph) and PATH.data (every weight), whatever its size.

    Why always external: onnxruntime maps an external data file instead of copying it out of the protobuf,
    and releases the mapping once MatMulNBits has prepacked the weights, so a served model holds one copy
    of its weights rather than two. Measured on SmolLM2-135M int8: a session holds less resident memory
    with the weights external, at the same decode speed (docs/serving.md, "Memory").
    """
    import onnx

    data = path.with_name(f"{path.name}.data")
    data.unlink(missing_ok=True)  # save_model appends to an existing data file
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=1024,
    )
    data.chmod(0o644)  # onnx creates it 0600; a service user other than the builder must read it like the graph


def _consumers(graph, name: str) -> list:
    return [n for n in graph.node if name in n.input]


def consumer_map(graph) -> dict[str, list]:
    """Every tensor's consuming nodes, in graph order (a tensor nothing reads maps to []): one pass, for the
    rewrites that follow many tensors."""
    from collections import defaultdict

    consumers: dict[str, list] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    return consumers


def upgrade_opset(model, version: int):
    """Convert the default-domain opset up to `version` (attributes that became inputs are moved)."""
    from onnx import version_converter

    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), version)
    return model if current >= version else version_converter.convert_version(model, version)


def lm_head(model):
    """The node that computes the `logits` output (the LM head), looking through Casts; None without one."""
    producers = {out: node for node in model.graph.node for out in node.output}
    head = producers.get("logits")
    while head is not None and head.op_type == "Cast":
        head = producers.get(head.input[0])
    return head


def logits_matmul(model) -> str | None:
    """Name of the (not yet quantized) MatMul that is the LM head, if there is one."""
    head = lm_head(model)
    return head.name if head is not None and head.op_type == "MatMul" else None


def fold_transposed_weights(model) -> int:
    """Replace Transpose(initializer) feeding only MatMuls or Gathers by a transposed initializer, so it can be
    quantized: optimum's tied LM head is MatMul(Transpose(embedding)), onnxruntime-genai's tied embedding is
    Gather(Transpose(LM head))."""
    from onnx import numpy_helper

    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    folded = 0
    for node in list(graph.node):
        if node.op_type != "Transpose" or node.input[0] not in initializers:
            continue
        users = _consumers(graph, node.output[0])
        if not users or not all(
            u.op_type == "MatMul" or (u.op_type == "Gather" and u.input[0] == node.output[0]) for u in users
        ):
            continue
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        weight = numpy_helper.to_array(initializers[node.input[0]])
        transposed = np.ascontiguousarray(np.transpose(weight, perm))
        new_name = f"{node.input[0]}_transposed_folded"
        graph.initializer.append(numpy_helper.from_array(transposed, new_name))
        for user in users:
            for index, name in enumerate(user.input):
                if name == node.output[0]:
                    user.input[index] = new_name
        graph.node.remove(node)
        folded += 1
    return folded


def quantize_embeddings_int8(model) -> int:
    """Per-row symmetric int8 for fp32 Gather tables (token embeddings): Gather rows, Gather scales, multiply.

    ONNX Runtime's GatherBlockQuantized takes 4 bits only; this keeps an 8-bit model's embedding at 8 bits.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    count = 0
    for node in list(graph.node):
        if node.op_type != "Gather" or node.input[0] not in initializers:
            continue
        table = initializers[node.input[0]]
        if table.data_type != TensorProto.FLOAT or len(table.dims) != 2 or table.dims[0] < 256:
            continue  # small tables (positions, types) are not worth it
        if len(_consumers(graph, node.input[0])) > 1:
            continue  # a table other nodes read too (the shared head's scales) is theirs to keep
        weight = numpy_helper.to_array(table)
        scale = np.maximum(np.abs(weight).max(axis=1, keepdims=True) / 127.0, 1e-12).astype(np.float32)
        quantized = np.clip(np.round(weight / scale), -127, 127).astype(np.int8)
        base = node.input[0]
        graph.initializer.remove(table)
        graph.initializer.extend(
            [numpy_helper.from_array(quantized, f"{base}_int8"), numpy_helper.from_array(scale, f"{base}_scale")]
        )
        out = node.output[0]
        index = list(graph.node).index(node)
        new_nodes = [
            helper.make_node("Gather", [f"{base}_int8", node.input[1]], [f"{out}_q"], name=f"{node.name}_q"),
            helper.make_node("Gather", [f"{base}_scale", node.input[1]], [f"{out}_s"], name=f"{node.name}_s"),
            helper.make_node("Cast", [f"{out}_q"], [f"{out}_f"], to=TensorProto.FLOAT, name=f"{node.name}_cast"),
            helper.make_node("Mul", [f"{out}_f", f"{out}_s"], [out], name=f"{node.name}_dequant"),
        ]
        graph.node.remove(node)
        for offset, new_node in enumerate(new_nodes):
            graph.node.insert(index + offset, new_node)
        count += 1
    # Another consumer of a replaced fp32 table (an unfolded tied head) would now dangle: refuse rather than break.
    known = {i.name for i in graph.initializer} | {i.name for i in graph.input}
    known |= {name for n in graph.node for name in n.output}
    for node in graph.node:
        missing = [name for name in node.input if name and name not in known]
        if missing:
            raise ValueError(f"{node.op_type} {node.name} still reads the replaced table {missing[0]}")
    return count


def tied_embedding(model, head: str | None) -> str | None:
    """The Gather whose fp32 table is the LM head's weight transposed (a tied embedding), after folding.

    Compared by value, so it holds whichever exporter wrote the graph and whichever way it was tied.
    """
    from onnx import TensorProto, numpy_helper

    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    head_node = next((n for n in graph.node if n.name == head), None)
    if head_node is None or head_node.input[1] not in initializers:
        return None
    head_weight = initializers[head_node.input[1]]
    head_transposed = None
    for node in graph.node:
        table = initializers.get(node.input[0]) if node.op_type == "Gather" else None
        if (
            table is None
            or table.data_type != TensorProto.FLOAT
            or len(table.dims) != 2
            or list(table.dims) != list(reversed(head_weight.dims))
        ):
            continue
        if head_transposed is None:
            head_transposed = numpy_helper.to_array(head_weight).T
        if np.array_equal(numpy_helper.to_array(table), head_transposed):
            return node.name
    return None


def share_head_with_embedding(model, gather: str) -> None:
    """Make the embedding Gather read the 8-bit LM head's quantized weight instead of a table of its own.

    The head is found again (lm_head): the quantizer has renamed it by now.

    MatMulNBits keeps its 8-bit weight as [vocab, blocks, block_size] unsigned bytes with a zero point of
    128 and scales [vocab, blocks], so a vocabulary row is a row of the head: gather it, subtract 128,
    multiply each block by its scale. Where the hidden size is not a multiple of the block size, the last
    block is padded and the padding is cut off. The separate table is gone from the file (its size for
    SmolLM2: docs/build.md, "Shared embedding"), and the embedding is as exact as the head's block-wise 8 bits.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    nodes = {n.name: n for n in graph.node}
    node = nodes[gather]
    head_node = lm_head(model)
    head = head_node.name
    bits = next((a.i for a in head_node.attribute if a.name == "bits"), 4)
    if head_node.op_type != "MatMulNBits" or bits != 8 or (len(head_node.input) > 3 and head_node.input[3]):
        raise ValueError(f"{head} is not a symmetric 8-bit MatMulNBits; its weight cannot serve as the embedding")
    weight, scales = head_node.input[1], head_node.input[2]
    k = next(a.i for a in head_node.attribute if a.name == "K")
    block_size = next(a.i for a in head_node.attribute if a.name == "block_size")
    padded = -(-k // block_size) * block_size  # the blocks' width: K rounded up to whole blocks
    ids, out, name = node.input[1], node.output[0], node.name
    rows = out if padded == k else f"{out}_padded"
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(128.0, dtype=np.float32), f"{name}_zero_point"),
            numpy_helper.from_array(np.array([-1], dtype=np.int64), f"{name}_last_axis"),
            numpy_helper.from_array(np.array([padded], dtype=np.int64), f"{name}_hidden"),
        ]
    )
    new_nodes = [
        helper.make_node("Gather", [weight, ids], [f"{out}_q"], name=f"{name}_q"),  # [.., blocks, size]
        helper.make_node("Cast", [f"{out}_q"], [f"{out}_f"], to=TensorProto.FLOAT, name=f"{name}_cast"),
        helper.make_node("Sub", [f"{out}_f", f"{name}_zero_point"], [f"{out}_c"], name=f"{name}_center"),
        helper.make_node("Gather", [scales, ids], [f"{out}_s"], name=f"{name}_s"),  # [.., blocks]
        helper.make_node("Unsqueeze", [f"{out}_s", f"{name}_last_axis"], [f"{out}_s1"], name=f"{name}_s1"),
        helper.make_node("Mul", [f"{out}_c", f"{out}_s1"], [f"{out}_d"], name=f"{name}_dequant"),
        helper.make_node("Shape", [ids], [f"{out}_ids_shape"], name=f"{name}_ids_shape"),
        helper.make_node(
            "Concat", [f"{out}_ids_shape", f"{name}_hidden"], [f"{out}_shape"], axis=0, name=f"{name}_shape"
        ),
        helper.make_node("Reshape", [f"{out}_d", f"{out}_shape"], [rows], name=f"{name}_rows"),
    ]
    if padded != k:
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.array([0], dtype=np.int64), f"{name}_start"),
                numpy_helper.from_array(np.array([k], dtype=np.int64), f"{name}_end"),
            ]
        )
        new_nodes.append(
            helper.make_node(
                "Slice", [rows, f"{name}_start", f"{name}_end", f"{name}_last_axis"], [out], name=f"{name}_unpad"
            )
        )
    index = list(graph.node).index(node)
    graph.node.remove(node)
    for offset, new_node in enumerate(new_nodes):
        graph.node.insert(index + offset, new_node)
    drop_unused_initializers(model)


def drop_unused_initializers(model) -> int:
    used = {name for n in model.graph.node for name in n.input}
    unused = [i for i in model.graph.initializer if i.name not in used]
    for initializer in unused:
        model.graph.initializer.remove(initializer)
    return len(unused)


# MatMulNBits attributes a fused node can take over from its siblings (N is summed).
_NBITS_SHARED = ("K", "bits", "block_size", "accuracy_level")


def _stack_rows(arrays: list[np.ndarray], weights: list[np.ndarray]) -> np.ndarray:
    """Per-row tensors of several MatMulNBits nodes as one: rows of the first node, then the next (kept flat
    when they were flat)."""
    rows = [a.reshape(w.shape[0], -1) for a, w in zip(arrays, weights, strict=True)]
    stacked = np.concatenate(rows)
    return stacked.reshape(-1) if arrays[0].ndim == 1 else stacked


def fuse_sibling_matmul_nbits(model) -> int:
    """Merge MatMulNBits nodes that read the same input into one over their stacked weights, then a Split.

    A decoder's gate and up projections (and optimum's separate q, k and v) each read the same normed
    hidden state; one kernel call over N1 + N2 columns instead of two halves the per-call overhead that
    dominates at one token a step, so decode is faster with the same tokens out (docs/build.md, "Sibling
    MatMuls"). Each output column is the same dot product as before; the kernel may tile a wider matrix
    differently, so results agree to rounding. Only plain nodes are merged (weights, scales and zero points, no
    group index or bias) whose weights nothing else reads (a shared embedding reads the LM head's).
    Returns how many nodes were removed.
    """
    from collections import Counter, defaultdict

    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    uses = Counter(name for node in graph.node for name in node.input)
    groups: dict[tuple, list] = defaultdict(list)
    for node in graph.node:
        if node.op_type != "MatMulNBits" or len(node.input) not in (3, 4) or len(node.output) != 1:
            continue
        if any(name not in initializers or uses[name] != 1 for name in node.input[1:]):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if set(attrs) - {"N", *_NBITS_SHARED}:
            continue
        # apart: mypy takes `d[(a, *b)]` for 3.11 syntax
        key = (node.input[0], len(node.input), *(attrs.get(k) for k in _NBITS_SHARED))
        groups[key].append((node, attrs))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 21)
    removed = 0
    for key, members in groups.items():
        if len(members) < 2:
            continue
        nodes = [node for node, _ in members]
        widths = [attrs["N"] for _, attrs in members]
        first = nodes[0]
        name = f"{first.name}_fused{len(nodes)}"
        weights = [numpy_helper.to_array(initializers[n.input[1]]) for n in nodes]
        # scales (and zero points) are per row of N, flat or [N, blocks]: stacked in the weights' order
        stacked = [
            _stack_rows([numpy_helper.to_array(initializers[n.input[i]]) for n in nodes], weights)
            for i in range(2, key[1])
        ]
        graph.initializer.append(numpy_helper.from_array(np.concatenate(weights), f"{name}.weight"))
        graph.initializer.extend(
            numpy_helper.from_array(array, f"{name}.{label}")
            for array, label in zip(stacked, ("scales", "zero_points"), strict=False)
        )
        fused_out = f"{name}/output_0"
        matmul = helper.make_node(
            "MatMulNBits",
            [key[0], f"{name}.weight", *(f"{name}.{label}" for label in ("scales", "zero_points")[: len(stacked)])],
            [fused_out],
            name=name,
            domain=first.domain or "com.microsoft",
            N=sum(widths),
            **{k: v for k, v in zip(_NBITS_SHARED, key[2:], strict=True) if v is not None},
        )
        outputs = [n.output[0] for n in nodes]
        if opset >= 13:
            graph.initializer.append(numpy_helper.from_array(np.array(widths, dtype=np.int64), f"{name}/split"))
            split = helper.make_node("Split", [fused_out, f"{name}/split"], outputs, name=f"{name}/Split", axis=-1)
        else:
            split = helper.make_node("Split", [fused_out], outputs, name=f"{name}/Split", axis=-1, split=widths)
        index = list(graph.node).index(first)
        for node in nodes:
            graph.node.remove(node)
        graph.node.insert(index, split)
        graph.node.insert(index, matmul)
        removed += len(nodes) - 1
    if removed:
        drop_unused_initializers(model)
    return removed


def keep_last_logits(model) -> bool:
    """Give the graph an input `num_logits_to_keep` ([1], int64) and compute the LM head for only the last that
    many positions of the hidden states.

    A prompt's pass needs the next-token logits of its last position only, but a graph computes the head (a
    fifth of SmolLM2's weights) and a [positions, vocabulary] float array for every position, which a long
    prompt pays for in prefill time and peak memory (docs/build.md, "Steps", export). The runtime feeds 1;
    validation feeds the window length for every position's logits.
    False when the graph has no `logits` output made by a MatMul (through Casts) or already has the input.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    if any(i.name == LOGITS_TO_KEEP for i in graph.input):
        return False
    head = lm_head(model)
    if head is None or head.op_type not in ("MatMul", "MatMulNBits"):
        return False
    hidden = head.input[0]
    prefix = "/lmpack/keep_last_logits"
    graph.input.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, [1]))
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([0], dtype=np.int64), f"{prefix}/zero"),
            numpy_helper.from_array(np.array([np.iinfo(np.int64).max], dtype=np.int64), f"{prefix}/end"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), f"{prefix}/axis"),
        ]
    )
    nodes = [
        helper.make_node("Shape", [hidden], [f"{prefix}/shape"], name=f"{prefix}/Shape"),
        helper.make_node(
            "Gather", [f"{prefix}/shape", f"{prefix}/axis"], [f"{prefix}/length"], name=f"{prefix}/Gather"
        ),
        helper.make_node("Sub", [f"{prefix}/length", LOGITS_TO_KEEP], [f"{prefix}/from_end"], name=f"{prefix}/Sub"),
        helper.make_node("Max", [f"{prefix}/from_end", f"{prefix}/zero"], [f"{prefix}/start"], name=f"{prefix}/Max"),
        helper.make_node(
            "Slice",
            [hidden, f"{prefix}/start", f"{prefix}/end", f"{prefix}/axis"],
            [f"{prefix}/hidden"],
            name=f"{prefix}/Slice",
        ),
    ]
    index = list(graph.node).index(head)
    for offset, node in enumerate(nodes):
        graph.node.insert(index + offset, node)
    head.input[0] = f"{prefix}/hidden"
    return True
