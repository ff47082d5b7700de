"""Tiny GGUF files of every family, written with the gguf package's writer from the families' random-weight
Hugging Face stand-ins (tests/families.py): what llama.cpp's converter would make of them.

Names come from gguf's own tensor map, the header keys from transformers' GGUF config mapping (read backwards),
and the tensor layouts are the converter's (Llama's rotary permutation of q and k, Gemma's norms stored as 1 + w),
so transformers loads the file back into the same model.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from lmpack.data import all_eval_text

# SentencePiece settings of each family's tokenizer.model: Llama's (a dummy prefix, <unk> <s> </s> first) and
# Gemma's (no dummy prefix, whitespace runs as pieces, <pad> <eos> <bos> <unk> first).
_SPM_STYLE = {
    "llama": {"add_dummy_prefix": True, "unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1},
    # XLM-RoBERTa's sentencepiece.bpe.model is a unigram model with NFKC normalisation
    "unigram": {
        "model_type": "unigram",
        "byte_fallback": False,
        "normalization_rule_name": "nmt_nfkc",
        "remove_extra_whitespaces": True,
        "unk_id": 3,
        "bos_id": 0,
        "eos_id": 2,
        "pad_id": 1,
    },
    "gemma2": {
        "add_dummy_prefix": False,
        "pad_id": 0,
        "eos_id": 1,
        "bos_id": 2,
        "unk_id": 3,
        "pad_piece": "<pad>",
        "eos_piece": "<eos>",
        "bos_piece": "<bos>",
        "allow_whitespace_only_pieces": True,
        "split_digits": True,
        "remove_extra_whitespaces": False,
    },
}


def train_spm(family: str, vocab_size: int = 700) -> bytes:
    """A SentencePiece model in `family`'s style: byte-fallback BPE (the kind Llama 2, Mistral and Gemma ship), or
    XLM-RoBERTa's unigram model ("unigram")."""
    import sentencepiece

    model = io.BytesIO()
    settings = {
        "model_type": "bpe",
        "byte_fallback": True,
        "normalization_rule_name": "identity",
        "remove_extra_whitespaces": False,
        **_SPM_STYLE[family],
    }
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(line for line in all_eval_text().split("\n") if line.strip()),
        model_writer=model,
        vocab_size=vocab_size,
        character_coverage=1.0,
        minloglevel=2,
        **settings,
    )
    return model.getvalue()


# tests/families.py family: (GGUF architecture, tokenizer.ggml.pre for a BPE vocabulary, as llama.cpp's converter
# names them; a Mistral GGUF is a "llama" whose general.name says mistral)
GGUF_OF_FAMILY = {
    "llama3": ("llama", "llama-bpe"),
    "qwen2": ("qwen2", "qwen2"),
    "qwen3": ("qwen3", "qwen2"),
    "gemma2": ("gemma2", None),
    "gemma3": ("gemma3", None),
    "phi3": ("phi3", None),
    "mistral": ("llama", None),
}
_CONTROL, _USER_DEFINED = 3, 4  # GGUF token types (SentencePiece's numbers)


def write_gguf(model_dir: Path, path: Path, family: str) -> Path:
    """`family`'s Hugging Face directory (tests/families.py) as llama.cpp's converter would write it: the header keys
    transformers maps back to the config, the tokenizer (a SentencePiece model's pieces, scores and types, or a
    BPE vocabulary with its merges and pre-tokenizer name) and the weights in GGUF's names and layouts."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    architecture, pre = GGUF_OF_FAMILY[family]
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = model.config.to_dict()
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name(f"tiny {family}")
    for key, attribute in GGUF_CONFIG_MAPPING[architecture].items():
        value = config.get(attribute) if attribute else None
        if isinstance(value, float):
            writer.add_float32(f"{architecture}.{key}", value)
        elif isinstance(value, int) and not isinstance(value, bool):
            writer.add_uint32(f"{architecture}.{key}", value)
    if config.get("head_dim") and "attention.key_length" not in GGUF_CONFIG_MAPPING[architecture]:
        # llama.cpp's converter writes the heads' width for every architecture; transformers maps it for a few
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    _write_vocabulary(writer, model_dir, tokenizer, pre)
    names = gguf.get_tensor_name_map(
        next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == architecture), config["num_hidden_layers"]
    )
    for hf_name, tensor in model.state_dict().items():
        weights = tensor.float().numpy()
        if architecture == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name):
            heads = config["num_attention_heads"] if ".q_proj." in hf_name else config["num_key_value_heads"]
            weights = _permute(weights, heads)
        if architecture.startswith("gemma") and hf_name.endswith("norm.weight"):
            weights = weights + 1  # llama.cpp stores Gemma's norms as 1 + w; transformers subtracts it back
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None or (hf_name == "lm_head.weight" and config.get("tie_word_embeddings")):
            continue
        writer.add_tensor(name, np.ascontiguousarray(weights, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _write_vocabulary(writer, model_dir: Path, tokenizer, pre: str | None) -> None:
    spm_file = model_dir / "tokenizer.model"
    added = {token.content: (i, token.special) for i, token in tokenizer.added_tokens_decoder.items()}
    if spm_file.is_file():
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(spm_file.read_bytes())
        tokens = [p.piece for p in proto.pieces]
        scores = [p.score for p in proto.pieces]
        types = [p.type for p in proto.pieces]
        for content, (_, special) in sorted(added.items(), key=lambda item: item[1][0]):
            if content not in tokens:
                tokens.append(content)
                scores.append(0.0)
                types.append(_CONTROL if special else _USER_DEFINED)
        writer.add_tokenizer_model("llama")
        writer.add_token_scores(scores)
        writer.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)
    else:
        document = json.loads((model_dir / "tokenizer.json").read_text())
        vocabulary = {**document["model"]["vocab"], **{c: i for c, (i, _) in added.items()}}
        tokens = [token for token, _ in sorted(vocabulary.items(), key=lambda item: item[1])]
        types = [(_CONTROL if added[t][1] else _USER_DEFINED) if t in added else 1 for t in tokens]
        merges = document["model"]["merges"]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre or "default")
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    for name in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{name}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{name}_token_id")(token_id)
    writer.add_add_bos_token(
        bool(tokenizer.bos_token_id is not None and tokenizer("x").input_ids[0] == tokenizer.bos_token_id)
    )
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf LlamaModel.permute: rotary halves interleaved, per head."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )
