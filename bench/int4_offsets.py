"""A probe for the int4 profile: 4-bit blocks of 32 with min-max integer zero points, with and without a per-block
offset correction that makes a block's float minimum exact while MatMulNBits keeps its int8 kernel.

    python bench/int4_offsets.py FP32_VARIANT_DIR/model [--speed-only]

A Q4_1 or Q4_K block holds d * q + m with a float minimum m. MatMulNBits computes d * (q - zp) with an integer
zp, which puts every weight of the block off by c = m + zp * d (at most half a step). The correction adds that
back: x @ W = MatMulNBits(x) + (x summed over each block of 32 inputs) @ C, where C [K / 32, N] holds each block's
c, one small fp32 MatMul beside each quantized one. Every MatMul but the LM head is quantized this way (the head
and the embedding stay fp32 in both rows, so the rows differ only in the layers). Scored like the quality gate
against the fp32 export (--speed-only skips that, for random-weight stand-ins); decode tokens/s over 64
one-token steps, 2 threads. Not part of any profile yet.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int8_sensitivity import eval_windows, logprobs, scores  # noqa: E402

BLOCK = 32


def quantized(source: Path, corrected: bool, head: bool = False):
    """The fp32 graph at `source` with its MatMuls (the LM head only if `head`) as 4-bit MatMulNBits, corrected or
    not."""
    from onnx import helper, numpy_helper

    from lmpack.steps.onnx_graph import load_model

    model = load_model(source)
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    nodes = []
    for node in graph.node:
        if node.op_type != "MatMul" or ("lm_head" in node.name and not head) or node.input[1] not in weights:
            nodes.append(node)
            continue
        nodes += _quantize(graph, node, numpy_helper.to_array(weights[node.input[1]]), corrected)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def _quantize(graph, node, weight: np.ndarray, corrected: bool) -> list:
    from onnx import helper, numpy_helper

    k, n = weight.shape
    blocks = k // BLOCK
    b = weight.T.astype(np.float64).reshape(n, blocks, BLOCK)
    low, high = b.min(-1, keepdims=True), b.max(-1, keepdims=True)
    step = np.where(high > low, (high - low) / 15, 1.0)
    zero = np.clip(np.round(-low / step), 0, 15)
    if corrected:  # q counts steps up from the block's minimum; the offset c puts the minimum back
        q, offset = np.round((b - low) / step), low + zero * step
    else:  # q counts steps from the rounded zero point, as a plain asymmetric quantizer does
        q, offset = np.clip(np.round(b / step + zero), 0, 15), None
    q = q.astype(np.uint8)
    zeros = zero.reshape(n, blocks).astype(np.uint8)
    if blocks % 2:
        zeros = np.concatenate([zeros, np.zeros((n, 1), np.uint8)], axis=1)
    name = node.name.replace("/", "_")
    graph.initializer.extend(
        [
            numpy_helper.from_array((q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8), f"{name}_q4"),
            numpy_helper.from_array(step.reshape(-1).astype(np.float32), f"{name}_scales"),
            numpy_helper.from_array((zeros[:, 0::2] | (zeros[:, 1::2] << 4)).reshape(-1), f"{name}_zero_points"),
        ]
    )
    output = node.output[0]
    product = f"{output}_nbits" if corrected else output
    made = [
        helper.make_node(
            "MatMulNBits",
            [node.input[0], f"{name}_q4", f"{name}_scales", f"{name}_zero_points"],
            [product],
            name=f"{node.name}_Q4",
            domain="com.microsoft",
            K=k,
            N=n,
            bits=4,
            block_size=BLOCK,
            accuracy_level=4,
        )
    ]
    if offset is not None:
        graph.initializer.extend(
            [
                numpy_helper.from_array(offset.reshape(n, blocks).T.astype(np.float32), f"{name}_offsets"),
                numpy_helper.from_array(np.array([0, 0, blocks, BLOCK], np.int64), f"{name}_blocks_shape"),
                numpy_helper.from_array(np.array([-1], np.int64), f"{name}_last_axis"),
            ]
        )
        made += [
            helper.make_node("Reshape", [node.input[0], f"{name}_blocks_shape"], [f"{name}_blocks"]),
            helper.make_node("ReduceSum", [f"{name}_blocks", f"{name}_last_axis"], [f"{name}_sums"], keepdims=0),
            helper.make_node("MatMul", [f"{name}_sums", f"{name}_offsets"], [f"{name}_correction"]),
            helper.make_node("Add", [product, f"{name}_correction"], [output]),
        ]
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant", type=Path, help="an fp32 variant's model directory (the reference)")
    parser.add_argument("--speed-only", action="store_true", help="decode speed and size, no quality")
    parser.add_argument(
        "--with-head", action="store_true", help="the LM head 4-bit too (for speed: it is read per token)"
    )
    args = parser.parse_args()

    from lmpack.steps.onnx_graph import save_model

    graph = args.variant / "model.onnx"
    chunks = eval_windows(args.variant / "tokenizer.json", 1024)
    reference = None if args.speed_only else logprobs(graph, chunks)
    print("| 4-bit layers, blocks of 32 | ONNX MB | top-1 | KL mean / p99 | perplexity | decode tok/s |")
    print("|---|---|---|---|---|---|")
    for corrected in (False, True):
        scratch = Path(tempfile.mkdtemp(prefix="lmpack-int4-offsets-"))
        try:
            save_model(quantized(graph, corrected, args.with_head), scratch / "model.onnx")
            quality = "not measured | | "
            if reference is not None:
                r = scores(reference, logprobs(scratch / "model.onnx", chunks), chunks)
                quality = f"{r['top1_agreement']:.4f} | {r['kl_mean']:.4f} / {r['kl_p99']:.3f} | "
                quality += f"{r['perplexity_increase']:+.2%}"
            speed = decode_speed(scratch / "model.onnx")
            size = sum(f.stat().st_size for f in scratch.iterdir()) / 1e6
        finally:
            shutil.rmtree(scratch)
        label = "integer zero points + per-block offsets" if corrected else "integer zero points (min-max)"
        print(f"| {label} | {size:.1f} | {quality} | {speed:.1f} |", flush=True)


def decode_speed(graph: Path, steps: int = 64) -> float:
    """One-token steps a second after a 20-token prompt (onnxruntime's default threads: 2 on this host)."""
    from lmpack.runtime.sessions import KVCache
    from lmpack.steps.onnx_eval import DecoderRunner

    runner = DecoderRunner(graph, kv_padding="right")
    cache = KVCache()
    runner.step(list(range(100, 120)), cache)
    started = time.perf_counter()
    for i in range(steps):
        runner.step([200 + i], cache)
    return steps / (time.perf_counter() - started)


if __name__ == "__main__":
    main()
