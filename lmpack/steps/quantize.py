"""Quantize: weight-only block-wise MatMulNBits (8 or 4 bit), ONNX Runtime dynamic int8, or fp16 for GPUs."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Literal

from lmpack.bundle.variant_dir import MODEL_INFO
from lmpack.errors import PlanError
from lmpack.pipeline.step import ONNX_MODEL, Artifact, Step, StepContext
from lmpack.steps.block_offsets import quantize_with_offsets
from lmpack.steps.export import onnx_model_path, read_model_info
from lmpack.steps.kv_cache import kv_cache_fp16
from lmpack.steps.onnx_graph import (
    fold_transposed_weights,
    fuse_sibling_matmul_nbits,
    load_model,
    logits_matmul,
    quantize_embeddings_int8,
    save_model,
    share_head_with_embedding,
    tied_embedding,
    upgrade_opset,
)

_PRECISION_OF_METHOD = {"dynamic_int8": "int8", "fp16": "fp16"}


@dataclasses.dataclass(frozen=True)
class QuantizeParams:
    method: Literal["matmul_nbits", "dynamic_int8", "fp16"] = "matmul_nbits"
    bits: Literal[4, 8] = 8
    block_size: Literal[16, 32, 64, 128] = 64
    symmetric: bool = True
    # 4 = int8 compute inside MatMulNBits: several times faster on CPU (docs/build.md has the numbers).
    accuracy_level: Literal[0, 1, 2, 3, 4] = 4
    # The token embedding is a Gather, not a MatMul: 8 = per-row int8, 4 = GatherBlockQuantized, 32 = keep fp32.
    embedding_bits: Literal[4, 8, 32] = 8
    # The LM head (the MatMul that produces the logits) is the most sensitive weight; 0 = same as `bits`.
    head_bits: Literal[0, 4, 8] = 0
    # A tied embedding reads the 8-bit head's quantized weight instead of a table of its own (embedding_bits
    # then applies only to untied models): a smaller file and an 8-bit embedding (docs/build.md, "Shared
    # embedding"); the runtime hands the head's mapped pages back after loading (runtime.heap).
    share_tied_embedding: bool = False
    # llama.cpp's mixed recipe (its Q4_K_M's use_more_bits): each layer's value projection
    # (in a packed QKV too) and MLP down projection, in the first and last eighth of the layers and every third
    # layer between, at this width; 0 = same as `bits`. docs/build.md, "The int4 profile", has the measurements.
    sensitive_bits: Literal[0, 8] = 0
    # The KV cache's element type: fp16 halves each sequence's cache (steps/kv_cache.py; GroupQueryAttention graphs,
    # that is onnxruntime-genai's export, with the matmul_nbits method; docs/serving.md, "KV cache precision").
    kv_cache: Literal["fp32", "fp16"] = "fp32"
    # The 4-bit MatMuls keep each block's float minimum: integer zero points plus a per-block offset added back
    # through a small MatMul of the input's block sums (steps/block_offsets.py; docs/build.md, "The int4 profile").
    block_offsets: bool = False

    def validate(self) -> str | None:
        if self.kv_cache == "fp16" and self.method != "matmul_nbits":
            return f'kv_cache = "fp16" goes with method = "matmul_nbits", not {self.method!r}'
        if self.block_offsets and (self.method != "matmul_nbits" or self.bits != 4):
            return 'block_offsets = true goes with method = "matmul_nbits" and bits = 4'
        return None


class QuantizeStep(Step):
    name = "quantize"
    consumes = ONNX_MODEL
    produces = ONNX_MODEL
    Params = QuantizeParams
    tools = ("onnx", "onnxruntime")

    def check(self, target, profile) -> None:
        needed = _PRECISION_OF_METHOD.get(self.params.method, f"int{self.params.bits}")
        if needed not in target.precisions:
            raise PlanError(
                f"quantize method {self.params.method} produces {needed}, which target "
                f"{target.name!r} does not support (supported: {', '.join(target.precisions)})"
            )

    def run(self, ctx: StepContext, source: Artifact, out_dir: Path) -> dict[str, Any]:
        shutil.copytree(
            source.path,
            out_dir,
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns("*.onnx", "*.onnx_data", "*.onnx.data"),
        )
        src_model = onnx_model_path(source.path)
        dst_model = out_dir / src_model.name
        method = self.params.method
        if method == "matmul_nbits":
            stats = _matmul_nbits(src_model, dst_model, self.params)
        elif method == "dynamic_int8":
            stats = _dynamic_int8(src_model, dst_model)
        else:
            stats = _fp16(src_model, dst_model)
        info = read_model_info(out_dir)
        info["quantization"] = {
            "method": method,
            **(
                {
                    "bits": self.params.bits,
                    "block_size": self.params.block_size,
                    "embedding_bits": self.params.embedding_bits,
                    "head_bits": self.params.head_bits or self.params.bits,
                    "sensitive_bits": self.params.sensitive_bits or self.params.bits,
                    "kv_cache": self.params.kv_cache,
                    "block_offsets": self.params.block_offsets,
                }
                if method == "matmul_nbits"
                else {}
            ),
        }
        (out_dir / MODEL_INFO).write_text(json.dumps(info, indent=2, sort_keys=True))
        return stats


def _matmul_nbits(src: Path, dst: Path, params: QuantizeParams) -> dict[str, Any]:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = load_model(src)
    folded = fold_transposed_weights(model)  # a tied LM head reaches MatMul through a Transpose
    op_types = ("MatMul", "Gather") if params.embedding_bits == 4 else ("MatMul",)
    if params.embedding_bits == 4:
        # GatherBlockQuantized needs int4 types (opset 21); the quantizer only bumps the number, so convert for real.
        model = upgrade_opset(model, 21)
    head = logits_matmul(model)
    head_bits = params.head_bits or params.bits
    # A tied embedding reads the 8-bit head's weight after quantization instead of keeping its own table.
    shared = (
        tied_embedding(model, head)
        if params.share_tied_embedding and head and head_bits == 8 and params.symmetric
        else None
    )
    # MatMuls at another width than `bits`, by width: the head (head_bits), the sensitive ones (sensitive_bits).
    wider: dict[int, set[str]] = {}
    if head and params.head_bits and params.head_bits != params.bits:
        wider.setdefault(params.head_bits, set()).add(head)
    if params.sensitive_bits and params.sensitive_bits != params.bits:
        wider.setdefault(params.sensitive_bits, set()).update(sensitive_matmuls(model))
    set_aside = set().union(*wider.values()) | ({shared} if shared else set())
    # The offsets' own MatMuls stay as they are (fp32): every quantizer pass leaves them out.
    offset_matmuls = set(
        quantize_with_offsets(
            model,
            {n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in set_aside},
            params.block_size,
            params.accuracy_level,
        )
        if params.block_offsets
        else ()
    )
    # nodes_to_include widens rather than narrows the quantizer's selection, so each pass excludes the rest.
    matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul"]
    passes: list[tuple[int, tuple[str, ...], list[str]]] = [
        (bits, ("MatMul",), [m for m in matmuls if m not in names]) for bits, names in sorted(wider.items())
    ]
    passes.append((params.bits, op_types, sorted(set_aside | offset_matmuls)))
    quiet = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # one INFO line per node, and warnings about the opset it raises itself
    try:
        for bits, types, exclude in passes:
            quantizer = MatMulNBitsQuantizer(
                model,
                bits=bits,
                block_size=params.block_size,
                is_symmetric=params.symmetric,
                accuracy_level=params.accuracy_level,
                nodes_to_exclude=exclude,
                op_types_to_quantize=types,
                quant_axes=(("MatMul", 0), ("Gather", 1)),
            )
            quantizer.process()
            model = quantizer.model.model
    finally:
        quiet.setLevel(level)
    if shared:
        share_head_with_embedding(model, shared)
    embeddings = quantize_embeddings_int8(model) if params.embedding_bits == 8 else 0
    fused = fuse_sibling_matmul_nbits(model)
    fp16_caches = kv_cache_fp16(model) if params.kv_cache == "fp16" else 0
    save_model(model, dst)
    ops = [n.op_type for n in model.graph.node]
    return {
        "matmul_nbits_nodes": ops.count("MatMulNBits"),
        "wider_matmuls": _wider_by_reason(wider, head),
        "gather_block_quantized_nodes": ops.count("GatherBlockQuantized"),
        "int8_embeddings": embeddings,
        "folded_transposes": folded,
        "embedding_shares_head": bool(shared),
        "fused_matmuls": fused,
        "fp16_kv_cache_layers": fp16_caches,
        "block_offset_matmuls": len(offset_matmuls),
    }


def _wider_by_reason(wider: dict[int, set[str]], head: str | None) -> dict[str, dict[str, list[str]]]:
    """Which MatMuls got another width than `bits`, and why: the report's "which layers, which precision"."""
    found: dict[str, dict[str, list[str]]] = {}
    for bits, names in sorted(wider.items()):
        for name in sorted(names):
            reason = "head_bits: the LM head" if name == head else "sensitive_bits: llama.cpp's use_more_bits"
            found.setdefault(str(bits), {}).setdefault(reason, []).append(name)
    return found


_LAYER_MATMUL = re.compile(r"layers\.(\d+)/.*\b(qkv_proj|v_proj|down_proj)/MatMul$")


def sensitive_matmuls(model) -> list[str]:
    """The MatMuls llama.cpp's mixed recipes keep wider (llama-quant.cpp's use_more_bits, in its integer
    arithmetic): value projections (a packed QKV included) and MLP down projections of the layers in the first
    and last eighth, and of every third layer between. Names of both exporters' graphs match."""
    found = [(int(m.group(1)), n.name) for n in model.graph.node if (m := _LAYER_MATMUL.search(n.name))]
    if not found:
        return []
    layers = max(index for index, _ in found) + 1
    return [
        name
        for index, name in found
        if index < layers // 8 or index >= 7 * layers // 8 or (index - layers // 8) % 3 == 2
    ]


def _dynamic_int8(src: Path, dst: Path) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    save_model(load_model(dst), dst)  # the weights to model.onnx.data, like every lmpack graph
    return {}


def _fp16(src: Path, dst: Path) -> dict[str, Any]:
    from lmpack.steps.fp16 import convert

    return convert(src, dst)
