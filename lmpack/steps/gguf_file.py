"""A GGUF source: the one owner of reading a GGUF file and of turning it into a Hugging Face directory.

transformers loads the weights (dequantized to fp32) and the tokenizer. For a SentencePiece vocabulary
(tokenizer.ggml.model "llama": pieces with scores and no merges) its GGUF converters are not faithful: Gemma's
builds a Unigram model from BPE scores and splits common words into letters. lmpack rebuilds such a tokenizer the
way transformers converts a repository's own tokenizer.model: a SentencePiece model made from the GGUF's pieces,
scores and types, then the family's slow tokenizer and transformers' slow-to-fast converter. Either way the
result is checked against the GGUF's own tokenizer (steps/tokenizer_check.py) before the pull is done.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmpack.errors import UnsupportedModelError
from lmpack.steps import tokenizer_check

GGUF_MAGIC = b"GGUF"
# tokenizer.ggml.model's value for a SentencePiece vocabulary (llama.cpp's LLAMA_VOCAB_TYPE_SPM)
SPM_VOCABULARY = "llama"
# general.architecture values whose SentencePiece tokenizer is Gemma's (no dummy prefix, whitespace pieces)
_GEMMA_ARCHITECTURES = frozenset({"gemma", "gemma2", "gemma3", "gemma3n"})
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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except (ValueError, KeyError, NotImplementedError) as exc:
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
        tokenizer._tokenizer = _spm_backend(spm_file, architecture, vocabulary)
        if hasattr(tokenizer, "update_post_processor"):  # Llama's and Gemma's fast tokenizers add BOS through it
            tokenizer.update_post_processor()
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


def spm_model_proto(vocabulary: dict[str, Any]) -> bytes:
    """A SentencePiece model of the GGUF's vocabulary, as llama.cpp reads it: BPE by piece score (its SPM
    tokenizer merges the best-scoring pair first), identity normalization, the dummy prefix when
    tokenizer.ggml.add_space_prefix says so (its default is on), byte fallback when the vocabulary has byte
    pieces. GGUF's token types are SentencePiece's piece types, number for number."""
    from sentencepiece import sentencepiece_model_pb2

    spm: Any = sentencepiece_model_pb2  # generated protobuf code: its classes are not visible to mypy
    tokens = vocabulary["tokenizer.ggml.tokens"]
    scores = vocabulary["tokenizer.ggml.scores"]
    types = vocabulary.get("tokenizer.ggml.token_type") or [spm.ModelProto.SentencePiece.NORMAL] * len(tokens)
    proto = spm.ModelProto()
    proto.trainer_spec.model_type = spm.TrainerSpec.BPE
    proto.trainer_spec.vocab_size = len(tokens)
    proto.trainer_spec.byte_fallback = spm.ModelProto.SentencePiece.BYTE in types
    special_ids = {"unk": "unknown_token_id", "bos": "bos_token_id", "eos": "eos_token_id", "pad": "padding_token_id"}
    for name, key in special_ids.items():
        token_id = vocabulary.get(f"tokenizer.ggml.{key}")
        setattr(proto.trainer_spec, f"{name}_id", int(token_id) if token_id is not None else -1)
    if types.count(spm.ModelProto.SentencePiece.UNKNOWN) != 1:  # SentencePiece needs exactly one unknown piece
        raise UnsupportedModelError("the GGUF's SentencePiece vocabulary has no single unknown token")
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = bool(vocabulary.get("tokenizer.ggml.add_space_prefix", True))
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    for token, score, kind in zip(tokens, scores, types, strict=True):
        proto.pieces.add(piece=token, score=float(score), type=int(kind))
    return proto.SerializeToString()


def _spm_backend(spm_file: Path, architecture: str, vocabulary: dict[str, Any]):
    """The tokenizers.Tokenizer transformers makes from a repository's tokenizer.model of this family: Gemma's
    slow tokenizer for Gemma, Llama's (legacy: the dummy prefix after special tokens too, as llama.cpp does) for
    the other SentencePiece families (Llama 2, Mistral, Phi-3)."""
    from transformers import GemmaTokenizer, LlamaTokenizer
    from transformers.convert_slow_tokenizer import convert_slow_tokenizer

    slow: GemmaTokenizer | LlamaTokenizer
    if architecture in _GEMMA_ARCHITECTURES:
        # Gemma's converter takes the first pieces' names from these (its own defaults otherwise)
        tokens = vocabulary["tokenizer.ggml.tokens"]
        keys = {"pad_token": "padding_token_id", "eos_token": "eos_token_id", "bos_token": "bos_token_id"}
        names = {
            name: tokens[int(vocabulary[f"tokenizer.ggml.{key}"])]
            for name, key in keys.items()
            if vocabulary.get(f"tokenizer.ggml.{key}") is not None
        }
        slow = GemmaTokenizer(vocab_file=str(spm_file), **names)
    else:
        add_prefix = bool(vocabulary.get("tokenizer.ggml.add_space_prefix", True))
        slow = LlamaTokenizer(vocab_file=str(spm_file), legacy=True, add_prefix_space=add_prefix)
    return convert_slow_tokenizer(slow)
