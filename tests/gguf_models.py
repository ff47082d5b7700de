"""Tiny GGUF files of several families, written with the gguf package's writer from a random-weight transformers
model and a SentencePiece tokenizer trained on lmpack's texts: what llama.cpp's converter would make of them.

Names come from gguf's own tensor map, the header keys from transformers' GGUF config mapping (read backwards),
and the tensor layouts are the converter's (Llama's rotary permutation of q and k, Gemma's norms stored as 1 + w),
so transformers loads the file back into the same model.
"""

from __future__ import annotations

import io
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


def _tiny_model(family: str, vocab_size: int, seed: int):
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    shape = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
    }
    if family == "gemma2":
        config = Gemma2Config(**shape, head_dim=16, sliding_window=256, pad_token_id=0, eos_token_id=1, bos_token_id=2)
        return Gemma2ForCausalLM(config).eval()
    return LlamaForCausalLM(LlamaConfig(**shape, bos_token_id=1, eos_token_id=2)).eval()


def write_spm_gguf(path: Path, family: str, spm_model: bytes, *, seed: int = 0) -> Path:
    """A GGUF of `family` ("llama" or "gemma2") with `spm_model`'s vocabulary (train_spm): pieces, scores and types,
    no merges, as llama.cpp's converter writes a tokenizer.model."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(spm_model)
    model = _tiny_model(family, len(proto.pieces), seed)
    config = model.config.to_dict()
    writer = gguf.GGUFWriter(str(path), family)
    writer.add_name(f"tiny {family}")
    for key, attribute in GGUF_CONFIG_MAPPING[family].items():
        value = config.get(attribute) if attribute else None
        if isinstance(value, float):
            writer.add_float32(f"{family}.{key}", value)
        elif isinstance(value, int) and not isinstance(value, bool):
            writer.add_uint32(f"{family}.{key}", value)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([p.piece for p in proto.pieces])
    writer.add_token_scores([p.score for p in proto.pieces])
    writer.add_token_types([p.type for p in proto.pieces])
    for name in ("unk", "bos", "eos", "pad"):
        token_id = getattr(proto.trainer_spec, f"{name}_id")
        if token_id >= 0:
            getattr(writer, f"add_{name}_token_id")(token_id)
    writer.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)
    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == family)
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    for hf_name, tensor in model.state_dict().items():
        weights = tensor.float().numpy()
        if family == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name):
            heads = config["num_attention_heads"] if ".q_proj." in hf_name else config["num_key_value_heads"]
            weights = _permute(weights, heads)
        if family == "gemma2" and hf_name.endswith("norm.weight"):
            weights = weights + 1  # llama.cpp stores Gemma's norms as 1 + w; transformers subtracts it back
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:  # lm_head, when tied to the embedding
            continue
        writer.add_tensor(name, np.ascontiguousarray(weights, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf LlamaModel.permute: rotary halves interleaved, per head."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )
