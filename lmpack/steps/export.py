"""Export: a Hugging Face directory to ONNX with a KV cache for decoders, or pooled-ready hidden states for encoders.

Two exporters, each for what it does best (docs/build.md, "Exporter choice"): onnxruntime-genai's model
builder for the decoder architectures it knows (a fused graph: GroupQueryAttention with rotary embedding
and the KV cache inside, SkipSimplifiedLayerNormalization; it decodes faster than optimum's graph), and
optimum's exporters for encoders, other decoders, and TensorRT targets (TensorRT has no GroupQueryAttention).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Literal

from lmpack.bundle.variant_dir import EMBEDDING, MODEL_INFO, TEXT_GENERATION
from lmpack.errors import StepError, UnsupportedModelError
from lmpack.pipeline.step import HF_MODEL, ONNX_MODEL, Artifact, Step, StepContext
from lmpack.steps.export_parity import check_export
from lmpack.steps.model_files import copy_side_files, sentence_pooling
from lmpack.steps.onnx_graph import keep_last_logits, load_model, save_model

ONNX_FILE = "model.onnx"
OPTIMUM, GENAI = "optimum", "onnxruntime-genai"
# Decoders onnxruntime-genai 0.12's builder makes fused graphs for (its create_model list, text-only ones), less
# Gemma 2: its builder puts the sliding window on the odd layers where Gemma 2 has it on the even ones (measured
# with the export parity check; docs/build.md, "Faithful to the source"), so Gemma 2 goes through optimum.
GENAI_ARCHITECTURES = frozenset(
    {
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "Phi3ForCausalLM",
        "GemmaForCausalLM",
        "GraniteForCausalLM",
        "OlmoForCausalLM",
        "SmolLM3ForCausalLM",
    }
)
# How a batch of pasts of different lengths is laid out. optimum's graphs take an attention mask over the
# whole window, so rows are left-padded; GroupQueryAttention reads each row's length from the mask (its sum)
# and writes the new keys right after it, so rows are right-padded.
KV_PADDING = {OPTIMUM: "left", GENAI: "right"}
# The float type of the builder's graph for each device (ExportParams.device).
GRAPH_PRECISION = {"cpu": "fp32", "cuda": "fp16"}
_OPTIMUM_TASK = {TEXT_GENERATION: "text-generation-with-past", EMBEDDING: "feature-extraction"}


@dataclasses.dataclass(frozen=True)
class ExportParams:
    opset: int = 18  # optimum's recommended minimum for llama-family decoders
    validate_export: bool = True
    # "auto": onnxruntime-genai's builder for GENAI_ARCHITECTURES, optimum otherwise.
    exporter: Literal["auto", "optimum", "onnxruntime-genai"] = "auto"
    # The export against PyTorch (steps/export_parity.py) on this many tokens of prose; 0 skips it. The tolerance
    # is on log-probabilities (embedding components for encoders): docs/build.md, "Faithful to the source".
    parity_tokens: int = 128
    parity_tolerance: float = 0.01
    # The device onnxruntime-genai's builder makes the graph for. "auto": "cuda" on targets with an NVIDIA GPU
    # (for profiles below fp32), "cpu" elsewhere. A CUDA graph computes in fp16 (its attention and 4-bit matmuls
    # have CUDA kernels for fp16 only) and keeps its KV cache in fp16; a CPU graph computes in fp32. optimum's
    # graphs are fp32 everywhere.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # The parity tolerance of an fp16 graph, whose log-probabilities carry fp16's rounding (docs/gpu-targets.md)
    parity_tolerance_fp16: float = 0.25


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
        f"(*ForCausalLM) for text generation and encoder models (*Model) for embeddings"
    )


def check_exportable(config: dict) -> None:
    """Raise UnsupportedModelError unless an exporter can take this model: a causal LM or an encoder, of an
    architecture the builder knows or a model type optimum exports (the message lists those)."""
    task = model_task(config)
    if choose_exporter(config, task, "auto") == GENAI:
        return
    model_type = str(config.get("model_type", "unknown"))
    supported = supported_model_types(task)
    if model_type.replace("_", "-") not in supported and model_type not in supported:
        raise UnsupportedModelError(
            f"model type {model_type!r} ({(config.get('architectures') or ['?'])[0]}) cannot be exported for "
            f"{task}; optimum exports these model types: {', '.join(supported)}"
        )


def supported_model_types(task: str) -> list[str]:
    from optimum.exporters.onnx import main_export
    from optimum.exporters.tasks import TasksManager

    del main_export  # imported for its side effect: it registers the ONNX export configurations

    return sorted(TasksManager.get_supported_model_type_for_task(_OPTIMUM_TASK[task], exporter="onnx"))


class ExportStep(Step):
    name = "export"
    consumes = HF_MODEL
    produces = ONNX_MODEL
    Params = ExportParams
    tools = ("optimum", "optimum-onnx", "onnxruntime-genai", "transformers", "torch", "onnx")

    def cache_extra(self, ctx: StepContext) -> dict[str, Any]:
        return {"device": self.graph_device(ctx)}

    def graph_device(self, ctx: StepContext) -> str:
        """The device the builder's graph is made for, "cuda" or "cpu" (ExportParams.device). "auto" makes the
        CUDA graph for an NVIDIA target unless the profile keeps full precision (fp32, tf32): its graph is the
        fp32 one."""
        if self.params.device != "auto":
            return self.params.device
        gpu = ctx.target.gpu if ctx.target is not None else None
        full = ctx.profile is not None and ctx.profile.precision in ("fp32", "tf32")
        return "cuda" if gpu is not None and gpu.vendor == "nvidia" and not full else "cpu"

    def run(self, ctx: StepContext, source: Artifact, out_dir: Path) -> dict[str, Any]:
        config = json.loads((source.path / "config.json").read_text())
        task = model_task(config)
        model_type = config.get("model_type", "unknown")
        exporter = choose_exporter(config, task, self.params.exporter)
        device = self.graph_device(ctx) if exporter == GENAI else "cpu"
        trust_remote_code = bool(ctx.options.get("trust_remote_code"))
        try:
            # Both exporters print progress to stdout; stdout belongs to the command's own (--json) output.
            with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer warnings about shapes are expected for decoders
                if exporter == GENAI:
                    _export_genai(source.path, out_dir, device=device, trust_remote_code=trust_remote_code)
                else:
                    _export_optimum(
                        source.path, out_dir, config, task, self.params, trust_remote_code=trust_remote_code
                    )
        except (UnsupportedModelError, StepError):  # already say what failed and why
            raise
        except Exception as exc:  # the exporters raise many types; the user needs the architecture and the cause
            raise StepError(f"ONNX export of {model_type} with {exporter} failed: {type(exc).__name__}: {exc}") from exc
        copy_side_files(source.path, out_dir)
        info = _model_info(config, task, exporter, source.path)
        info["graph_device"] = device
        (out_dir / MODEL_INFO).write_text(json.dumps(info, indent=2, sort_keys=True))
        measured: dict[str, Any] = {"task": task, "model_type": model_type, "exporter": exporter, "device": device}
        if self.params.parity_tokens:
            with ctx.progress("export parity with PyTorch", 1) as advance:
                measured["parity"] = {"graph": GRAPH_PRECISION[device]} | check_export(
                    source.path,
                    out_dir / ONNX_FILE,
                    info,
                    tokens=self.params.parity_tokens,
                    tolerance=self.params.parity_tolerance_fp16 if device == "cuda" else self.params.parity_tolerance,
                    trust_remote_code=trust_remote_code,
                )
                advance(1)
        return measured


def choose_exporter(config: dict, task: str, wanted: str) -> str:
    """The exporter for this model: `wanted`, or with "auto" the builder where it knows the architecture."""
    architecture = (config.get("architectures") or [None])[0]
    fits_genai = task == TEXT_GENERATION and architecture in GENAI_ARCHITECTURES
    if wanted == GENAI and not fits_genai:
        raise UnsupportedModelError(
            f"onnxruntime-genai's builder cannot export {architecture} for {task}; it makes decoders of the "
            f"architectures {', '.join(sorted(GENAI_ARCHITECTURES))}",
            hint='use exporter = "optimum"',
        )
    if wanted == "auto":
        return GENAI if fits_genai else OPTIMUM
    return wanted


def _export_optimum(
    src: Path, out_dir: Path, config: dict, task: str, params: ExportParams, *, trust_remote_code: bool
) -> None:
    from optimum.exporters.onnx import main_export

    main_export(
        str(src),
        output=out_dir,
        task=_OPTIMUM_TASK[task],
        opset=params.opset,
        device="cpu",
        library_name="transformers",
        trust_remote_code=trust_remote_code,
        do_validation=params.validate_export,
        local_files_only=True,
    )
    # optimum embeds the weights up to 2 GB; lmpack always keeps them in model.onnx.data (onnx_graph.save_model)
    model = load_model(out_dir / ONNX_FILE)
    for data in out_dir.glob(f"{ONNX_FILE}_data"):
        data.unlink()
    save_model(model, out_dir / ONNX_FILE)


def _export_genai(src: Path, out_dir: Path, *, device: str, trust_remote_code: bool) -> None:
    """onnxruntime-genai's model builder, fp32 for the CPU or fp16 for CUDA (`device`): lmpack's own quantize step
    makes the 8- and 4-bit graphs (its int8 keeps the embedding in the graph's float type). Only the graph is
    kept: the builder's genai_config.json and its copies
    of the tokenizer files would be a second, unused description of the model. The graph gets lmpack's
    `num_logits_to_keep` input (onnx_graph.keep_last_logits), so a prompt's pass computes one position's logits."""
    import tempfile

    import onnx
    from onnxruntime_genai.models.builder import create_model

    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".genai-") as scratch:
        built, cache = Path(scratch) / "out", Path(scratch) / "cache"
        src = _builder_view(src, Path(scratch) / "model")
        chatter = io.StringIO()  # a line per layer and a progress bar per tensor: kept for the error, not shown
        try:
            with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
                # hf_remote is the builder's trust_remote_code (on unless told); hf_token=false: no token lookup.
                create_model(
                    None,
                    str(src),
                    str(built),
                    GRAPH_PRECISION[device],
                    device,
                    str(cache),
                    hf_remote=trust_remote_code,
                    hf_token="false",
                )
        except Exception as exc:
            tail = " | ".join(chatter.getvalue().strip().splitlines()[-3:])
            raise StepError(
                f"onnxruntime-genai's builder failed: {type(exc).__name__}: {exc}"
                + (f" (its last output: {tail})" if tail else "")
            ) from exc
        # The builder already writes lmpack's layout (the graph, its weights in model.onnx.data): move, not rewrite.
        for name in (ONNX_FILE, f"{ONNX_FILE}.data"):
            if (built / name).is_file():
                shutil.move(built / name, out_dir / name)
    # Only the graph is rewritten; the weights stay where the builder put them.
    graph = onnx.load(str(out_dir / ONNX_FILE), load_external_data=False)
    if keep_last_logits(graph):
        onnx.save_model(graph, str(out_dir / ONNX_FILE))


def _builder_view(src: Path, view: Path) -> Path:
    """`src` as the builder must see it. The builder reads a rotary scaling's original context length only from the
    config's top level (rope_scaling is a dict, its hasattr() test never finds the key there), and otherwise takes
    the whole context: Llama 3.1-3.3's frequencies (rope_type "llama3") and YaRN's came out rescaled at the wrong
    wavelengths. The view links every file of `src` and writes config.json with that length at the top level too."""
    config = json.loads((src / "config.json").read_text())
    original = (config.get("rope_scaling") or {}).get("original_max_position_embeddings")
    if original is None or "original_max_position_embeddings" in config:
        return src
    view.mkdir()
    for item in src.iterdir():
        if item.name != "config.json":
            (view / item.name).symlink_to(item.resolve())
    (view / "config.json").write_text(json.dumps({**config, "original_max_position_embeddings": original}, indent=2))
    return view


def _model_info(config: dict, task: str, exporter: str, source: Path) -> dict[str, Any]:
    info: dict[str, Any] = {
        "schema_version": 1,
        "task": task,
        "onnx": ONNX_FILE,
        "exporter": exporter,
        "model_type": config.get("model_type"),
        "architecture": (config.get("architectures") or [None])[0],
    }
    if task == TEXT_GENERATION:
        heads = config.get("num_attention_heads")
        info.update(
            {
                "num_layers": config.get("num_hidden_layers"),
                "num_kv_heads": config.get("num_key_value_heads", heads),
                "head_dim": config.get("head_dim") or (config["hidden_size"] // heads if heads else None),
                "vocab_size": config.get("vocab_size"),
                "max_position_embeddings": config.get("max_position_embeddings"),
                "kv_padding": KV_PADDING[exporter],
            }
        )
    else:
        pooling, normalize = sentence_pooling(source)
        info.update({"pooling": pooling, "normalize": normalize, "hidden_size": config.get("hidden_size")})
    return info


def onnx_model_path(artifact_dir: Path) -> Path:
    info = json.loads((artifact_dir / MODEL_INFO).read_text())
    return artifact_dir / info["onnx"]


def read_model_info(artifact_dir: Path) -> dict[str, Any]:
    return json.loads((artifact_dir / MODEL_INFO).read_text())
