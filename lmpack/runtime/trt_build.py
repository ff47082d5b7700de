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
# Every option lmpack sends to onnxruntime's TensorRT provider. The provider refuses a name it does not know
# (and onnxruntime then falls back to CUDA without saying more than "EP Error"); tests/test_tensorrt.py checks
# this list against the names onnxruntime documents.
BUILD_OPTIONS = (
    "trt_max_workspace_size",
    "trt_builder_optimization_level",
    "trt_engine_cache_enable",
    "trt_engine_cache_path",
    "trt_dump_ep_context_model",
    "trt_ep_context_file_path",
    "trt_ep_context_embed_mode",
    "trt_timing_cache_enable",
    "trt_timing_cache_path",
    "trt_engine_hw_compatible",
    "trt_sparsity_enable",
    "trt_profile_min_shapes",
    "trt_profile_opt_shapes",
    "trt_profile_max_shapes",
)


def engine_options(
    *,
    workspace_gib: float,
    builder_optimization_level: int,
    hardware_compatible: bool,
    shapes: dict[str, str],
    timing_cache: bool,
    sparse_weights: bool,
    out_dir: Path,
) -> dict[str, Any]:
    """TensorRT provider options for one build into `out_dir`: workspace, level, caches, EP context, shapes.

    No precision flag: the engine takes the precision of the graph's own types (an fp16 graph makes an fp16
    engine). TensorRT 11 removed the fp16/bf16/int8 builder flags, and with TensorRT 10 setting one makes the
    provider build a weakly typed network, which may run any layer in fp32 or fp16 as it times them.

    The engine cache path is relative: the provider puts it under the EP context model's folder and writes
    that relative path into the model (ep_cache_context), which is the only form onnxruntime loads (it refuses
    an absolute path or one with ".."), so the folder can be moved, renamed and shipped.
    """
    options: dict[str, Any] = {
        "trt_max_workspace_size": int(workspace_gib * (1 << 30)),
        "trt_builder_optimization_level": builder_optimization_level,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": ENGINES_DIR,
        "trt_dump_ep_context_model": True,
        "trt_ep_context_file_path": str(out_dir / ENGINE_MODEL),
        "trt_ep_context_embed_mode": 0,  # the engine stays a separate file, hashed in the manifest like any other
        "trt_timing_cache_enable": timing_cache,
        "trt_timing_cache_path": str(out_dir / ENGINES_DIR),
        "trt_engine_hw_compatible": hardware_compatible,
        "trt_sparsity_enable": sparse_weights,
        **shapes,
    }
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
