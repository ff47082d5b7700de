"""A GGUF source: the one owner of reading a GGUF file and of turning it into a Hugging Face directory.

transformers loads the weights (dequantized to fp32) and the tokenizer; where its GGUF converters are not
faithful, steps/gguf_tokenizer.py rebuilds the tokenizer as the family ships it. Either way the result is checked
against the GGUF's own tokenizer (steps/tokenizer_check.py) before the pull is done.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmpack.errors import UnsupportedModelError
from lmpack.steps import tokenizer_check
from lmpack.steps.gguf_tokenizer import (
    BPE_VOCABULARY,
    SPM_VOCABULARY,
    set_bpe_pre_tokenizer,
    spm_backend,
    spm_model_proto,
)

GGUF_MAGIC = b"GGUF"
# GGUF's sampling keys (llama.cpp's gguf constants) and generation_config.json's names for them
_GGUF_SAMPLING = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_p": "top_p",
    "general.sampling.top_k": "top_k",
    "general.sampling.penalty_repeat": "repetition_penalty",
}


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == GGUF_MAGIC


def read_fields(path: Path, prefix: str) -> dict[str, Any]:
    """The header's fields whose keys start with `prefix`, as Python values (arrays as lists)."""
    from gguf import GGUFReader

    return {key: field.contents() for key, field in GGUFReader(path).fields.items() if key.startswith(prefix)}


def gguf_metadata(path: Path) -> dict[str, Any]:
    """The header's general.* strings and numbers; informational, so an odd header gives what it can."""
    try:
        fields = read_fields(path, "general.")
    except Exception:  # an odd header must not fail the build: transformers reads the model itself
        return {}
    found: dict[str, Any] = {}
    for key, value in fields.items():
        if isinstance(value, float):
            found[key] = round(value, 6)
        elif isinstance(value, (str, int)) and not isinstance(value, bool):
            found[key] = value
    return found


def gguf_sampling(metadata: dict[str, Any]) -> dict[str, Any]:
    """The GGUF's own sampling settings under generation_config.json's names (empty when it sets none)."""
    return {ours: metadata[theirs] for theirs, ours in _GGUF_SAMPLING.items() if theirs in metadata}


def to_hf_directory(gguf_path: Path, out_dir: Path) -> dict[str, Any]:
    """Write the GGUF as a standard Hugging Face directory: fp32 safetensors, a tokenizer checked against the GGUF's
    own, and the GGUF's sampling settings (general.sampling.*) as generation_config.json's, where the server reads
    its defaults. Returns what the pull records about the source."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        _head_dim_from_header(config, gguf_path)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, config=config)
    except (ValueError, KeyError, AttributeError, NotImplementedError, RuntimeError) as exc:
        # what transformers raises for a GGUF it reads wrongly: a missing key, a tensor of the wrong shape
        raise UnsupportedModelError(
            f"{gguf_path}: transformers cannot load this GGUF ({exc})",
            hint="GGUF loading supports the architectures listed in transformers' gguf docs",
        ) from None
    model.save_pretrained(out_dir, safe_serialization=True)
    del model
    vocabulary = read_fields(gguf_path, "tokenizer.ggml.")
    architecture = str(read_fields(gguf_path, "general.architecture").get("general.architecture", ""))
    spm_file = None
    if vocabulary.get("tokenizer.ggml.model") == SPM_VOCABULARY and "tokenizer.ggml.scores" in vocabulary:
        spm_file = out_dir.parent / f".{out_dir.name}.spm.model"
        spm_file.write_bytes(spm_model_proto(vocabulary))
        tokenizer._tokenizer = spm_backend(spm_file, architecture, vocabulary)
        if hasattr(tokenizer, "update_post_processor"):  # Llama's and Gemma's fast tokenizers add BOS through it
            tokenizer.update_post_processor()
    elif vocabulary.get("tokenizer.ggml.model") == BPE_VOCABULARY:
        set_bpe_pre_tokenizer(tokenizer._tokenizer, vocabulary.get("tokenizer.ggml.pre"))
    tokenizer.save_pretrained(out_dir)
    try:
        check = tokenizer_check.check_gguf_tokenizer(gguf_path, out_dir / "tokenizer.json", vocabulary, spm_file)
    finally:
        if spm_file is not None:
            spm_file.unlink()
    metadata = gguf_metadata(gguf_path)
    sampling = gguf_sampling(metadata)
    if sampling:
        config_path = out_dir / "generation_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        config_path.write_text(json.dumps({**config, **sampling}, indent=2, sort_keys=True))
    return {"license": metadata.get("general.license"), "name": metadata.get("general.name"), "tokenizer": check}


def _head_dim_from_header(config: Any, gguf_path: Path) -> None:
    """The attention heads' width from the header's {arch}.attention.key_length, where transformers' GGUF mapping
    leaves it out (Qwen3's) and the config would take hidden_size / heads: Qwen3-0.6B's and 4B's are wider."""
    architecture = read_fields(gguf_path, "general.architecture").get("general.architecture")
    key_length = read_fields(gguf_path, f"{architecture}.attention.key_length").get(
        f"{architecture}.attention.key_length"
    )
    if isinstance(key_length, int) and hasattr(config, "head_dim") and config.head_dim != key_length:
        config.head_dim = key_length
