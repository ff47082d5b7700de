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

import numpy as np

from lmpack.bundle.variant_dir import MODEL_INFO, TEXT_GENERATION
from lmpack.config.serve import DEFAULT_MAX_BATCH
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
    """The engine's optimization profile: it accepts shapes between min and max and is tuned for opt.

    onnxruntime's TensorRT provider runs every engine on its first profile only, so one profile covers both
    a prompt (many tokens, empty cache) and a decode step (one token, full cache): each axis has its own range.
    The bounds are what `lmpack serve` may send: `max_batch` sequences in one run (serve's max_batch, whose
    default this shares) and `max_sequence` tokens of prompt and completion together (serve refuses a wider
    batch and caps the context to it). Encoders: `max_batch` texts of at most `max_sequence` tokens."""

    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = DEFAULT_MAX_BATCH
    opt_sequence: int = 128
    max_sequence: int = 4096
    timing_cache: bool = True
    sparse_weights: bool = False

    def validate(self) -> str | None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            return "batch sizes must satisfy 1 <= min_batch <= opt_batch <= max_batch"
        if not 1 <= self.opt_sequence <= self.max_sequence:
            return "sequence lengths must satisfy 1 <= opt_sequence <= max_sequence"
        return None


# The precisions an engine can have: its graph's float type (no precision flags, see trt_build.engine_options).
_GRAPH_PRECISIONS = ("fp32", "fp16")


class TensorrtStep(Step):
    name = "tensorrt"
    consumes = ONNX_MODEL
    produces = ONNX_MODEL
    Params = TensorrtParams
    uses_target = True  # an engine is built for one GPU
    tools = ("onnxruntime-gpu", "tensorrt", "nvidia-ml-py")

    def check(self, target, profile) -> None:
        converted = any(
            spec.name == "quantize" and spec.params.get("method") == "fp16"
            for spec in profile.steps[: [s.name for s in profile.steps].index(self.name)]
        )
        if profile.precision not in _GRAPH_PRECISIONS:
            raise PlanError(
                f"step 'tensorrt' builds engines in the precision of their graph (fp32, or fp16 after a quantize "
                f'step with method = "fp16"), not {profile.precision!r}'
            )
        if profile.precision == "fp16" and not converted:
            raise PlanError(
                'an fp16 engine needs an fp16 graph: put a quantize step with method = "fp16" before the '
                "tensorrt step (TensorRT 11 has no fp16 flag; an fp32 graph makes an fp32 engine)"
            )
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
        options = provider_options(target, info, self.params, out_dir)
        model = onnx_model_path(out_dir)
        build_engine(model, options)
        if not (out_dir / ENGINE_MODEL).is_file():
            raise StepError(f"the TensorRT provider did not write {ENGINE_MODEL}")
        facts = {
            **gpu,
            **_runtime_versions(),
            "precision": graph_precision(model),  # what the engine has, whatever the profile asked for
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

    A decoder's inputs: input_ids and position_ids [batch, new tokens], attention_mask [batch, past + new],
    past_key_values.N.{key,value} [batch, kv_heads, past, head_dim]. Min: one token, empty cache. Opt: a decode
    step at opt_sequence. Max: a whole prompt of max_sequence tokens, or a step with the cache full. Encoders:
    input_ids, attention_mask, token_type_ids [batch, sequence].
    """
    batches = {"min": params.min_batch, "opt": params.opt_batch, "max": params.max_batch}
    shapes = {}
    for level, batch in batches.items():
        if info["task"] == TEXT_GENERATION:
            new, total = {"min": (1, 1), "opt": (1, params.opt_sequence), "max": (params.max_sequence,) * 2}[level]
            past = {"min": 0, "opt": params.opt_sequence - 1, "max": params.max_sequence - 1}[level]
            entries = [f"input_ids:{batch}x{new}", f"position_ids:{batch}x{new}", f"attention_mask:{batch}x{total}"]
            for layer in range(info["num_layers"]):
                for kind in ("key", "value"):
                    entries.append(
                        f"past_key_values.{layer}.{kind}:{batch}x{info['num_kv_heads']}x{past}x{info['head_dim']}"
                    )
        else:
            length = {"min": 1, "opt": params.opt_sequence, "max": params.max_sequence}[level]
            entries = [f"{name}:{batch}x{length}" for name in ("input_ids", "attention_mask", "token_type_ids")]
        shapes[f"trt_profile_{level}_shapes"] = ",".join(entries)
    return shapes


def graph_precision(model: Path) -> str:
    """The float type most of the graph's weights have ("fp32" or "fp16"): the precision of a strongly typed
    engine built from it. Read from the initializers' headers; no weights are loaded."""
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    counts = {"fp32": 0, "fp16": 0}
    kinds = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16"}
    for init in graph.initializer:
        if init.data_type in kinds:
            counts[kinds[init.data_type]] += int(np.prod(init.dims)) if init.dims else 1
    return max(counts, key=counts.__getitem__)


def provider_options(target, info: dict[str, Any], params: TensorrtParams, out_dir: Path) -> dict[str, Any]:
    """TensorRT provider options for one build: workspace, optimization level, caches, EP context, shapes."""
    trt = target.tensorrt
    return engine_options(
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
