"""A probe for the int4 profile: 4-bit blocks of 32 with min-max integer zero points, with and without a per-block
offset correction that makes a block's float minimum exact while MatMulNBits keeps its int8 kernel.

    python bench/int4_offsets.py FP32_VARIANT_DIR/model [--speed-only]

A Q4_1 or Q4_K block holds d * q + m with a float minimum m. MatMulNBits computes d * (q - zp) with an integer
zp, which puts every weight of the block off by c = m + zp * d (at most half a step). The correction adds that
back: x @ W = MatMulNBits(x) + (x summed over each block of 32 inputs) @ C, where C [K / 32, N] holds each block's
c, one small fp32 MatMul beside the quantized ones that read the same input. Every MatMul but the LM head is
quantized this way (the head and the embedding stay fp32 in both rows, so the rows differ only in the layers).
Scored like the quality gate against the fp32 export (--speed-only skips that, for random-weight stand-ins);
decode tokens/s over 64 one-token steps, 2 threads. The quantize step's `block_offsets = true` is the same
correction inside a profile (with the int4 profile's 8-bit head and layers).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int8_sensitivity import eval_windows, logprobs, scores  # noqa: E402

BLOCK = 32


def quantized(source: Path, corrected: bool, head: bool = False):
    """The fp32 graph at `source` with its MatMuls (the LM head only if `head`) as 4-bit MatMulNBits in blocks of
    32: with the per-block offsets (lmpack.steps.block_offsets, the quantize step's `block_offsets`), or with
    onnxruntime's min-max integer zero points alone."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from lmpack.steps.block_offsets import quantize_with_offsets
    from lmpack.steps.onnx_graph import load_model, logits_matmul

    model = load_model(source)
    weights = {init.name for init in model.graph.initializer}
    excluded = set() if head else {logits_matmul(model)}
    names = {n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights} - excluded
    if corrected:
        quantize_with_offsets(model, names, BLOCK, accuracy_level=4)
        return model
    others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in names]
    quantizer = MatMulNBitsQuantizer(
        model, bits=4, block_size=BLOCK, is_symmetric=False, accuracy_level=4, nodes_to_exclude=others
    )
    quantizer.process()
    return quantizer.model.model


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
