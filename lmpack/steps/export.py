"""Export: a Hugging Face directory to ONNX with optimum's exporters (decoders with KV cache, encoders).

Why optimum and not onnxruntime-genai's model builder: see docs/build.md ("Exporter choice").
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import warnings
from pathlib import Path
from typing import Any

from lmpack.errors import StepError, UnsupportedModelError
from lmpack.pipeline.step import HF_MODEL, ONNX_MODEL, Artifact, Step, StepContext, register
from lmpack.runtime.variant import EMBEDDING, MODEL_INFO, TEXT_GENERATION
from lmpack.steps.model_files import copy_side_files

ONNX_FILE = "model.onnx"
_OPTIMUM_TASK = {TEXT_GENERATION: "text-generation-with-past", EMBEDDING: "feature-extraction"}


@dataclasses.dataclass(frozen=True)
class ExportParams:
    opset: int = 18  # optimum's recommended minimum for llama-family decoders
    validate_export: bool = True


def model_task(config: dict) -> str:
    """text-generation for causal LMs, feature-extraction for encoders; anything else is unsupported."""
    architectures = config.get("architectures") or []
    architecture = architectures[0] if architectures else config.get("model_type", "unknown")
    if architecture.endswith("ForCausalLM"):
        return TEXT_GENERATION
    if architecture.endswith("Model") and not architecture.endswith("PreTrainedModel"):
        return EMBEDDING
    raise UnsupportedModelError(
        f"architecture {architecture} is not supported: lmpack exports causal language models "
        f"(*ForCausalLM) for text generation and encoder models (*Model) for embeddings")


def supported_model_types(task: str) -> list[str]:
    from optimum.exporters.onnx import main_export
    from optimum.exporters.tasks import TasksManager

    del main_export  # imported for its side effect: it registers the ONNX export configurations

    return sorted(TasksManager.get_supported_model_type_for_task(_OPTIMUM_TASK[task], exporter="onnx"))


@register
class ExportStep(Step):
    name = "export"
    consumes = HF_MODEL
    produces = ONNX_MODEL
    Params = ExportParams
    tools = ("optimum", "optimum-onnx", "transformers", "torch", "onnx")

    def run(self, ctx: StepContext, source: Artifact, out_dir: Path) -> dict[str, Any]:
        config = json.loads((source.path / "config.json").read_text())
        task = model_task(config)
        model_type = config.get("model_type", "unknown")
        supported = supported_model_types(task)
        if model_type.replace("_", "-") not in supported and model_type not in supported:
            raise UnsupportedModelError(
                f"model type {model_type!r} ({(config.get('architectures') or ['?'])[0]}) cannot be exported for "
                f"{task}; supported model types: {', '.join(supported)}")
        from optimum.exporters.onnx import main_export

        try:
            # optimum prints progress to stdout; stdout belongs to the command's own (--json) output.
            with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer warnings about shapes are expected for decoders
                main_export(str(source.path), output=out_dir, task=_OPTIMUM_TASK[task], opset=self.params.opset,
                            device="cpu", library_name="transformers",
                            trust_remote_code=bool(ctx.options.get("trust_remote_code")),
                            do_validation=self.params.validate_export, local_files_only=True)
        except Exception as exc:  # optimum raises many types; the user needs the architecture and the cause
            raise StepError(f"ONNX export of {model_type} failed: {type(exc).__name__}: {exc}") from exc
        copy_side_files(source.path, out_dir)
        info = _model_info(config, task)
        (out_dir / MODEL_INFO).write_text(json.dumps(info, indent=2, sort_keys=True))
        return {"task": task, "model_type": model_type, "exporter": "optimum"}


def _model_info(config: dict, task: str) -> dict[str, Any]:
    info: dict[str, Any] = {"schema_version": 1, "task": task, "onnx": ONNX_FILE, "exporter": "optimum",
                            "model_type": config.get("model_type"),
                            "architecture": (config.get("architectures") or [None])[0]}
    if task == TEXT_GENERATION:
        heads = config.get("num_attention_heads")
        info.update({
            "num_layers": config.get("num_hidden_layers"),
            "num_kv_heads": config.get("num_key_value_heads", heads),
            "head_dim": config.get("head_dim") or (config["hidden_size"] // heads if heads else None),
            "vocab_size": config.get("vocab_size"),
            "max_position_embeddings": config.get("max_position_embeddings"),
        })
    else:
        info.update({"pooling": "mean", "normalize": True, "hidden_size": config.get("hidden_size")})
    return info


def onnx_model_path(artifact_dir: Path) -> Path:
    info = json.loads((artifact_dir / MODEL_INFO).read_text())
    return artifact_dir / info["onnx"]


def read_model_info(artifact_dir: Path) -> dict[str, Any]:
    return json.loads((artifact_dir / MODEL_INFO).read_text())
