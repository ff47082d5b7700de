"""Where an 8-bit variant loses agreement with its source: each kind of MatMul left in fp32 in turn, 8-bit weights
alone (fp32 compute), and llama.cpp's own q8_0 against its f32 on the same tokens, for scale.

    python bench/int8_sensitivity.py FP32_VARIANT_DIR [--llamacpp F32.gguf Q8_0.gguf] [--tokens-per-domain 1024]
    python bench/int8_sensitivity.py --llamacpp F32.gguf Q4_K_M.gguf     # llama.cpp's row alone, any quantization

FP32_VARIANT_DIR is an fp32 build (`lmpack build MODEL --target cpu-x86 --profile fp32`): the reference, and the
graph each row quantizes as the int8 profile does (MatMulNBits, 8 bits, blocks of 32 with zero points, int8
compute: accuracy level 4), except for what the row names. Every row is scored like the quality gate (the six
evaluation texts, windows of 256 tokens): top-1 agreement, KL mean and p99, perplexity change. The llama.cpp rows
need llama-cpp-python (bench/README.md); their tokens are llama.cpp's own, from the same texts.
"""

from __future__ import annotations

import argparse
import copy
import logging
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

ROWS = {
    "every MatMul 8-bit, int8 compute (the int8 profile)": ("level 4", None),
    "every MatMul 8-bit, fp32 compute (8-bit weights alone)": ("level 1", None),
    "the LM head left fp32": ("level 4", r"lm_head"),
    "attention QKV projections left fp32": ("level 4", r"qkv_proj|[qkv]_proj"),
    "attention output projections left fp32": ("level 4", r"o_proj"),
    "MLP gate and up projections left fp32": ("level 4", r"gate_proj|up_proj|gate_up_proj"),
    "MLP down projections left fp32": ("level 4", r"down_proj"),
}


def quantized(model, keep_fp32: str | None, level: int):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from lmpack.steps.onnx_graph import fuse_sibling_matmul_nbits, quantize_embeddings_int8

    model = copy.deepcopy(model)
    kept = [n.name for n in model.graph.node if n.op_type == "MatMul" and keep_fp32 and re.search(keep_fp32, n.name)]
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=8,
        block_size=32,
        is_symmetric=False,
        accuracy_level=level,
        nodes_to_exclude=kept,
        op_types_to_quantize=("MatMul",),
        quant_axes=(("MatMul", 0),),
    )
    quantizer.process()
    model = quantizer.model.model
    quantize_embeddings_int8(model)
    fuse_sibling_matmul_nbits(model)
    return model


def scores(reference: list[np.ndarray], candidate: list[np.ndarray], chunks: list[np.ndarray]) -> dict:
    """The quality gate's numbers (its Positions: top1_agreement, kl_mean, kl_p99, perplexity_increase) for
    `candidate`'s log-probabilities against `reference`'s over the same windows."""
    from lmpack.steps.validate import Positions

    positions = Positions()
    for ref, cand, chunk in zip(reference, candidate, chunks, strict=True):
        positions.add(ref, cand, chunk)
    return positions.summary()


def eval_windows(tokenizer_json: Path, tokens_per_domain: int) -> list[np.ndarray]:
    """The gate's evaluation texts as windows of 256 tokens, `tokens_per_domain` of each text."""
    from tokenizers import Tokenizer

    from lmpack.data import eval_texts
    from lmpack.steps.onnx_eval import windows

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    return [c for t in eval_texts().values() for c in windows(tokenizer.encode(t).ids[:tokens_per_domain], 256)]


def logprobs(graph: Path, chunks: list[np.ndarray]) -> list[np.ndarray]:
    """Each window's next-token log-probabilities under the ONNX graph at `graph`."""
    from lmpack.steps.onnx_eval import DecoderRunner, log_softmax

    runner = DecoderRunner(graph)
    return [log_softmax(runner.logits(c)[:-1]) for c in chunks]


def lmpack_rows(variant: Path, tokens_per_domain: int) -> dict[str, dict]:
    from lmpack.steps.onnx_graph import load_model, save_model

    chunks = eval_windows(variant / "tokenizer.json", tokens_per_domain)
    reference = logprobs(variant / "model.onnx", chunks)
    base = load_model(variant / "model.onnx")
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.ERROR)
    found = {}
    for label, (level, keep) in ROWS.items():
        scratch = Path(tempfile.mkdtemp(prefix="lmpack-int8-sensitivity-"))
        try:
            save_model(quantized(base, keep, int(level.split()[1])), scratch / "model.onnx")
            found[label] = scores(reference, logprobs(scratch / "model.onnx", chunks), chunks)
        finally:
            shutil.rmtree(scratch)
        print(row(f"lmpack: {label}", found[label]), flush=True)
    return found


def llamacpp_row(reference_gguf: Path, quantized_gguf: Path, tokens_per_domain: int) -> dict:
    from llama_cpp import Llama

    from lmpack.data import eval_texts
    from lmpack.steps.onnx_eval import log_softmax, windows

    def llamacpp_logprobs(path: Path, chunks=None):  # llama.cpp's own tokens of the texts, unless given
        llm = Llama(model_path=str(path), n_ctx=256, n_batch=256, logits_all=True, n_threads=2, verbose=False)
        if chunks is None:
            ids = [
                llm.tokenize(t.encode(), add_bos=False, special=False)[:tokens_per_domain]
                for t in eval_texts().values()
            ]
            chunks = [c for domain in ids for c in windows(domain, 256)]
        out = []
        for chunk in chunks:
            llm.reset()
            llm.eval(chunk.tolist())
            out.append(log_softmax(np.array(llm.scores[: len(chunk) - 1], dtype=np.float32)))
        return out, chunks

    reference, chunks = llamacpp_logprobs(reference_gguf)
    candidate, _ = llamacpp_logprobs(quantized_gguf, chunks)
    return scores(reference, candidate, chunks)


def row(label: str, r: dict) -> str:
    return (
        f"| {label} | {r['tokens']} | {r['top1_agreement']:.4f} | {r['kl_mean']:.5f} / {r['kl_p99']:.4f} | "
        f"{r['perplexity_increase']:+.2%} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant", type=Path, nargs="?", help="an fp32 variant directory (the reference)")
    parser.add_argument("--llamacpp", nargs=2, type=Path, metavar=("REFERENCE_GGUF", "QUANTIZED_GGUF"))
    parser.add_argument("--tokens-per-domain", type=int, default=1024)
    args = parser.parse_args()
    if not args.variant and not args.llamacpp:
        parser.error("name an fp32 variant, --llamacpp, or both")
    print("| variant | tokens | top-1 | KL mean / p99 | perplexity |\n|---|---|---|---|---|")
    if args.variant:
        lmpack_rows(args.variant, args.tokens_per_domain)
    if args.llamacpp:
        reference, quantized = args.llamacpp
        measured = llamacpp_row(reference, quantized, args.tokens_per_domain)
        print(row(f"llama.cpp: {quantized.name} against {reference.name}", measured))


if __name__ == "__main__":
    main()
