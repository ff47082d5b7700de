"""TensorRT: build an engine for an NVIDIA target through ONNX Runtime's TensorRT execution provider.

The provider compiles the ONNX graph into a TensorRT engine and, with `trt_dump_ep_context_model`,
writes an "EP context" ONNX model that wraps the engine. The runtime keeps loading ONNX with ONNX
Runtime (one code path for CPU and GPU, KV cache through the same session); the engine's facts
(TensorRT, CUDA and driver versions, GPU name and compute capability, flags) go into
lmpack-model.json so a server can tell whether the shipped engine fits its GPU. Why this and not
TensorRT's own Python runtime: docs/gpu-targets.md.

This module has never run against a real TensorRT here (no GPU, no TensorRT on the build machines);
docs/gpu-targets.md lists what did and did not run.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from lmpack.bundle.variant_dir import MODEL_INFO, TEXT_GENERATION
from lmpack.errors import PlanError, StepError
from lmpack.pipeline.step import ONNX_MODEL, Artifact, Step, StepContext
from lmpack.runtime.host import (
    onnxruntime_conflict,
    onnxruntime_packages,
    probe_driver,
    probe_gpus,
    probe_onnxruntime,
    probe_tensorrt_version,
)
from lmpack.runtime.trt_build import build_engine, engine_options
from lmpack.runtime.trt_plan import ENGINE_MODEL
from lmpack.steps.export import onnx_model_path, read_model_info


@dataclasses.dataclass(frozen=True)
class TensorrtParams:
    # Optimization profile: the engine accepts shapes between min and max and is tuned for opt.
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 4
    min_sequence: int = 1
    opt_sequence: int = 128
    max_sequence: int = 2048
    timing_cache: bool = True
    sparse_weights: bool = False

    def validate(self) -> str | None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            return "batch sizes must satisfy 1 <= min_batch <= opt_batch <= max_batch"
        if not 1 <= self.min_sequence <= self.opt_sequence <= self.max_sequence:
            return "sequence lengths must satisfy 1 <= min_sequence <= opt_sequence <= max_sequence"
        return None


class TensorrtStep(Step):
    name = "tensorrt"
    consumes = ONNX_MODEL
    produces = ONNX_MODEL
    Params = TensorrtParams
    uses_target = True  # an engine is built for one GPU
    tools = ("onnxruntime-gpu", "tensorrt", "nvidia-ml-py")

    def check(self, target, profile) -> None:
        if target.gpu is None or target.tensorrt is None:
            raise PlanError(
                f"step 'tensorrt' needs an NVIDIA target with a [tensorrt] table; target "
                f"{target.name!r} has {'no GPU' if target.gpu is None else 'no TensorRT options'}",
                hint="use a CPU profile (int8, int4) for CPU targets",
            )
        if self.params.sparse_weights and "2:4" not in target.sparsity:
            raise PlanError(f"sparse_weights needs 2:4 sparse kernels, which target {target.name!r} lacks")

    def run(self, ctx: StepContext, source: Artifact, out_dir: Path) -> dict[str, Any]:
        if (conflict := onnxruntime_conflict(onnxruntime_packages())) is not None:
            raise StepError(f"cannot build a TensorRT engine here: {conflict}")
        gpu = gpu_facts()
        if gpu is None:
            raise StepError(
                "building a TensorRT engine needs an NVIDIA GPU on the build host, and none was found",
                hint="build on a GPU host, or let the server build the engine from the bundled ONNX",
            )
        shutil.copytree(source.path, out_dir, dirs_exist_ok=True)
        info = read_model_info(out_dir)
        target, profile = ctx.target, ctx.profile
        # a build sets both, and check() refused a target without a [tensorrt] table
        assert target is not None and target.tensorrt is not None and profile is not None
        options = provider_options(target, profile.precision, info, self.params, out_dir)
        build_engine(onnx_model_path(out_dir), options)
        if not (out_dir / ENGINE_MODEL).is_file():
            raise StepError(f"the TensorRT provider did not write {ENGINE_MODEL}")
        facts = {
            **gpu,
            **_runtime_versions(),
            "precision": profile.precision,
            "hardware_compatibility": target.tensorrt.hardware_compatibility,
            "version_compatible": target.tensorrt.version_compatible,
            "sparse_weights": self.params.sparse_weights,
            "profile_shapes": {k: options[k] for k in options if k.startswith("trt_profile_")},
        }
        info["tensorrt"] = {"engine_model": ENGINE_MODEL, **facts}
        (out_dir / MODEL_INFO).write_text(json.dumps(info, indent=2, sort_keys=True))
        return facts


def profile_shapes(info: dict[str, Any], params: TensorrtParams) -> dict[str, str]:
    """trt_profile_{min,opt,max}_shapes for every dynamic input, in the provider's "name:AxB,..." form.

    A decoder's inputs: input_ids and position_ids [batch, sequence], attention_mask [batch, past + sequence],
    past_key_values.N.{key,value} [batch, kv_heads, past, head_dim]. At min the past is empty, at opt and max
    it fills the rest of the window. Encoders: input_ids, attention_mask, token_type_ids [batch, sequence].
    """
    shapes = {}
    for level, batch, sequence in (
        ("min", params.min_batch, params.min_sequence),
        ("opt", params.opt_batch, params.opt_sequence),
        ("max", params.max_batch, params.max_sequence),
    ):
        if info["task"] == TEXT_GENERATION:
            past = 0 if level == "min" else sequence - 1
            step = 1 if level != "min" else sequence
            entries = [
                f"input_ids:{batch}x{step}",
                f"position_ids:{batch}x{step}",
                f"attention_mask:{batch}x{past + step}",
            ]
            for layer in range(info["num_layers"]):
                for kind in ("key", "value"):
                    entries.append(
                        f"past_key_values.{layer}.{kind}:{batch}x{info['num_kv_heads']}x{past}x{info['head_dim']}"
                    )
        else:
            entries = [f"{name}:{batch}x{sequence}" for name in ("input_ids", "attention_mask", "token_type_ids")]
        shapes[f"trt_profile_{level}_shapes"] = ",".join(entries)
    return shapes


def provider_options(
    target, precision: str, info: dict[str, Any], params: TensorrtParams, out_dir: Path
) -> dict[str, Any]:
    """TensorRT provider options for one build: precision, workspace, optimization level, caches, EP context."""
    trt = target.tensorrt
    return engine_options(
        precision=precision,
        workspace_gib=trt.workspace_gib,
        builder_optimization_level=trt.builder_optimization_level,
        hardware_compatible=trt.hardware_compatibility == "ampere_plus",
        shapes=profile_shapes(info, params),
        timing_cache=params.timing_cache,
        sparse_weights=params.sparse_weights,
        out_dir=out_dir,
    )


def gpu_facts() -> dict[str, Any] | None:
    """GPU 0's name and compute capability and the driver, through the host probes; None without a GPU."""
    gpus, _ = probe_gpus()
    if not gpus:
        return None
    driver, cuda = probe_driver()
    return {
        "gpu_name": gpus[0].name,
        "compute_capability": gpus[0].compute_capability,
        "driver_version": driver,
        "cuda_driver_version": cuda,
    }


def _runtime_versions() -> dict[str, str | None]:
    """The versions a server compares with its own (lmpack/runtime/trt_plan.py), probed the way it probes them:
    TensorRT from its Python package or libnvinfer, the CUDA that onnxruntime-gpu was built for."""
    ort_version, cuda, _ = probe_onnxruntime()
    return {"onnxruntime_version": ort_version, "cuda_version": cuda, "tensorrt_version": probe_tensorrt_version()}
