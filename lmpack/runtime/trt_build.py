"""Build a TensorRT engine through onnxruntime's TensorRT provider: one code path for the build host's
`tensorrt` step and the server's rebuild of an engine that does not fit its GPU.

It lives on the runtime side because the server rebuilds (runtime/ never imports steps/); the step
imports it. Creating the session with `trt_dump_ep_context_model` compiles the engine and writes an EP
context model (model_ctx.onnx) that points at it under `engines/` (docs/gpu-targets.md).

Never run here: no GPU and no TensorRT on the machines this was written on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmpack.errors import StepError
from lmpack.runtime.trt_plan import CUDA_EP, ENGINE_MODEL, TENSORRT_EP

ENGINES_DIR = "engines"
# Precision flags of the TensorRT provider, by profile precision; fp32 and tf32 need none.
PRECISION_FLAGS = {"fp16": "trt_fp16_enable", "bf16": "trt_bf16_enable", "int8": "trt_int8_enable"}


def engine_options(
    *,
    precision: str,
    workspace_gib: float,
    builder_optimization_level: int,
    hardware_compatible: bool,
    shapes: dict[str, str],
    timing_cache: bool,
    sparse_weights: bool,
    out_dir: Path,
) -> dict[str, Any]:
    """TensorRT provider options for one build into `out_dir`: precision, workspace, level, caches, EP context."""
    options: dict[str, Any] = {
        "trt_max_workspace_size": int(workspace_gib * (1 << 30)),
        "trt_builder_optimization_level": builder_optimization_level,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(out_dir / ENGINES_DIR),
        "trt_dump_ep_context_model": True,
        "trt_ep_context_file_path": str(out_dir / ENGINE_MODEL),
        "trt_ep_context_embed_mode": 0,  # the engine stays a separate file, hashed in the manifest like any other
        "trt_ep_context_compute_capability_enable": True,  # the provider refuses it on another compute capability
        "trt_timing_cache_enable": timing_cache,
        "trt_timing_cache_path": str(out_dir / ENGINES_DIR),
        "trt_engine_hw_compatible": hardware_compatible,
        "trt_sparsity_enable": sparse_weights,
        **shapes,
    }
    if precision in PRECISION_FLAGS:
        options[PRECISION_FLAGS[precision]] = True
    return options


def build_engine(model: Path, options: dict[str, Any]) -> None:
    """Compile `model` with the TensorRT provider; the EP context model and engine land where `options` say."""
    import onnxruntime as ort

    if TENSORRT_EP not in ort.get_available_providers():
        raise StepError(
            "this onnxruntime has no TensorrtExecutionProvider",
            hint="install onnxruntime-gpu (lmpack[gpu]) and TensorRT",
        )
    try:
        # Creating the session compiles the engine and writes the EP context model.
        ort.InferenceSession(str(model), providers=[(TENSORRT_EP, options), CUDA_EP])
    except Exception as exc:  # the provider raises plain RuntimeErrors with TensorRT's message
        raise StepError(f"TensorRT engine build failed: {exc}") from exc
