"""A GGUF's tokenizer as its family ships it, where transformers' GGUF converters are not faithful.

- A SentencePiece vocabulary (tokenizer.ggml.model "llama": pieces with scores and no merges): Gemma's converter
  builds a Unigram model from BPE scores and splits common words into letters. lmpack rebuilds the tokenizer the
  way transformers converts a repository's own tokenizer.model: a SentencePiece model made from the GGUF's pieces,
  scores and types, then the family's slow tokenizer and transformers' slow-to-fast converter.
- A BPE vocabulary (tokenizer.ggml.model "gpt2"): the converters give every family GPT-2's pre-tokenizer, so a
  Llama 3 GGUF split "1825" after a space unlike Llama 3 (its regex keeps digits apart, in threes). lmpack sets
  the pre-tokenizer llama.cpp uses for the GGUF's tokenizer.ggml.pre (src/llama-vocab.cpp, llm_tokenizer_bpe).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmpack.errors import UnsupportedModelError

# tokenizer.ggml.model's values (llama.cpp's LLAMA_VOCAB_TYPE_SPM and _BPE)
SPM_VOCABULARY, BPE_VOCABULARY = "llama", "gpt2"
# general.architecture values whose SentencePiece tokenizer is Gemma's (no dummy prefix, whitespace pieces)
_GEMMA_ARCHITECTURES = frozenset({"gemma", "gemma2", "gemma3", "gemma3n"})

# llama.cpp's pre-tokenizer regexes, applied one after the other, by the tokenizer.ggml.pre names that select them
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BPE_PRE_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe"), (_LLAMA3,)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), (_QWEN2,)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r"), (r"\p{N}", _GPT2)),
    "gpt-2": (_GPT2,),
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+"),
}


def set_bpe_pre_tokenizer(backend: Any, pre: str | None) -> bool:
    """Give `backend` (a tokenizers.Tokenizer of byte-level BPE) llama.cpp's pre-tokenizer for `pre`; False where
    lmpack does not know `pre` (transformers' conversion stays, and the tokenizer check judges it)."""
    from tokenizers import Regex, pre_tokenizers

    splits = BPE_PRE_SPLITS.get(pre or "default")
    if splits is None:
        return False
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            *(pre_tokenizers.Split(Regex(pattern), behavior="isolated") for pattern in splits),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    return True


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


def spm_backend(spm_file: Path, architecture: str, vocabulary: dict[str, Any]):
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
