"""Which models lmpack builds, and on what: the families it is tested on, and the checks that refuse a model it
cannot build, or a build that cannot fit in memory, before the build does any work (a pull can copy gigabytes,
a GGUF's dequantization takes minutes)."""

from __future__ import annotations

import json
from pathlib import Path

from lmpack.errors import InsufficientMemoryError, UnsupportedModelError
from lmpack.pipeline.step import Artifact
from lmpack.steps.export import check_exportable
from lmpack.steps.gguf_file import read_fields
from lmpack.steps.model_files import parameter_count

# The matrix every release is tested on (tests/test_families.py; docs/build.md, "Supported models"), by the
# name users know and the transformers architecture it loads as.
TESTED_FAMILIES = {
    "Llama 2, Llama 3, SmolLM": "LlamaForCausalLM",
    "Qwen2, Qwen2.5": "Qwen2ForCausalLM",
    "Qwen3": "Qwen3ForCausalLM",
    "Gemma 2": "Gemma2ForCausalLM",
    "Gemma 3 (text)": "Gemma3ForCausalLM",
    "Phi-3": "Phi3ForCausalLM",
    "Mistral": "MistralForCausalLM",
    "BERT (MiniLM, BGE, E5)": "BertModel",
    "XLM-RoBERTa (multilingual E5)": "XLMRobertaModel",
}


def tested_families() -> str:
    return ", ".join(TESTED_FAMILIES)


def check_buildable(source: Artifact) -> None:
    """Refuse a model lmpack cannot build, from its config alone: an architecture that is neither a causal LM nor
    an encoder, or a model type no exporter knows; for a GGUF, an architecture transformers cannot load."""
    if source.info.get("kind") == "gguf":
        _check_gguf(source.path)
        return
    config_file = Path(source.path) / "config.json"
    if not config_file.is_file():
        return  # the pull names what is missing
    try:
        check_exportable(json.loads(config_file.read_text()))
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(
            f"{exc.message}. lmpack is tested on {tested_families()}",
            hint='docs/build.md, "Supported models", says what to do for a family that is missing',
        ) from None


def _check_gguf(path: Path) -> None:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    architecture = read_fields(path, "general.architecture").get("general.architecture")
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path.name}: GGUF architecture {architecture!r} cannot be loaded (transformers reads "
            f"{', '.join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ('general', 'tokenizer'))}). "
            f"lmpack is tested on {tested_families()}",
            hint="build from the model's Hugging Face repository instead of its GGUF",
        )


# A build's peak memory, as a multiple of the model's weights at fp32, plus the libraries' own: the pull, the
# export and the parity check each hold one fp32 copy at a time, the exporter's graph another (docs/build.md,
# "Measurements": the peak build RSS column).
_PEAK_OVER_FP32 = 3.0
_LIBRARIES_BYTES = 1 << 30


def check_memory(source: Artifact) -> dict[str, int]:
    """Refuse a build that cannot fit before it starts, with the memory it needs against what is available."""
    import psutil

    parameters = _gguf_parameters(source.path) if source.info.get("kind") == "gguf" else parameter_count(source.path)
    needed = int(parameters * 4 * _PEAK_OVER_FP32) + _LIBRARIES_BYTES
    available = int(psutil.virtual_memory().available)
    if needed > available:
        raise InsufficientMemoryError(
            f"building this model ({parameters / 1e9:.2f} billion weights) needs about {needed / 2**30:.1f} GiB of "
            f"memory; {available / 2**30:.1f} GiB are available",
            hint="build on a machine with more memory, or pass --no-memory-check to try anyway",
        )
    return {"parameters": parameters, "needed_bytes": needed, "available_bytes": available}


def _gguf_parameters(path: Path) -> int:
    from gguf import GGUFReader

    return sum(int(tensor.n_elements) for tensor in GGUFReader(path).tensors)
