"""Tiny random-weight stand-ins of the model families users bring, as Hugging Face directories.

Each keeps what sets its family apart in the real config (named below: Qwen2's q/k/v biases, Qwen3's and Gemma 3's
q/k norms and wide heads, Gemma 2's soft-capping and sliding window, Phi-3's fused projections, Llama 3's rotary
scaling) and its real tokenizer kind (byte-level BPE with merges, or SentencePiece BPE with byte fallback), and
shrinks the sizes to a few layers of width 64 so a build takes seconds.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from gguf_models import train_spm
from tiny_onnx import train_bpe

_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}
# family: (config class, the real config's distinguishing values at tiny sizes, tokenizer kind)
FAMILIES = {
    # meta-llama/Llama-3.2-1B: rotary scaling "llama3", rope_theta 500000, tied embeddings
    "llama3": (
        "LlamaConfig",
        {
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 32.0,
                "high_freq_factor": 4.0,
                "low_freq_factor": 1.0,
                "original_max_position_embeddings": 128,
            },
            "tie_word_embeddings": True,
            "rms_norm_eps": 1e-5,
        },
        "bpe",
    ),
    # Qwen/Qwen2.5-0.5B-Instruct: biases on q, k, v; rope_theta 1e6; tied embeddings
    "qwen2": ("Qwen2Config", {"rope_theta": 1000000.0, "tie_word_embeddings": True, "rms_norm_eps": 1e-6}, "bpe"),
    # Qwen/Qwen3-0.6B: q and k RMS norms, head_dim wider than hidden/heads
    "qwen3": (
        "Qwen3Config",
        {"head_dim": 32, "rope_theta": 1000000.0, "tie_word_embeddings": True, "rms_norm_eps": 1e-6},
        "bpe",
    ),
    # google/gemma-2-2b-it: soft-capping of attention and final logits, sliding window, wide heads, GeGLU; the
    # attention scale's 256 is the 2B's and 9B's (and what a GGUF, which does not store it, loads with)
    "gemma2": (
        "Gemma2Config",
        {
            "head_dim": 32,
            "query_pre_attn_scalar": 256,
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
            "sliding_window": 16,
            "hidden_activation": "gelu_pytorch_tanh",
        },
        "gemma-spm",
    ),
    # google/gemma-3-1b-it: q and k norms, five local layers with their own rotary base to one global layer
    "gemma3": (
        "Gemma3TextConfig",
        {
            "num_hidden_layers": 6,
            "head_dim": 32,
            "query_pre_attn_scalar": 256,
            "sliding_window": 16,
            "rope_local_base_freq": 10000.0,
            "rope_theta": 1000000.0,
        },
        "gemma-spm",
    ),
    # microsoft/Phi-3-mini-4k-instruct: fused qkv_proj and gate_up_proj, untied head
    "phi3": (
        "Phi3Config",
        {
            "tie_word_embeddings": False,
            "rms_norm_eps": 1e-5,
            # Phi-3-mini-4k: 4k context, the same as the original (no LongRoPE), which a GGUF's config defaults to
            "max_position_embeddings": 4096,
            "original_max_position_embeddings": 4096,
        },
        "spm",
    ),
    # mistralai/Mistral-7B-Instruct-v0.3: rope_theta 1e6, untied head, SentencePiece
    "mistral": ("MistralConfig", {"rope_theta": 1000000.0, "tie_word_embeddings": False}, "spm"),
}
# Chat templates in each family's shape (its markup, where BOS goes, what it refuses, the Jinja it relies on:
# trim, raise_exception, namespace, string methods), with the control tokens it needs and its end-of-turn tokens.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) "
    "or (message.role == 'assistant') %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + "
    "'\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
QWEN3_TEMPLATE = (
    "{%- set ns = namespace(last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}{%- if message.role == 'user' %}"
    "{%- set ns.last_query_index = messages|length - 1 - loop.index0 %}{%- break %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}{%- set content = message.content %}"
    "{%- if message.role == 'assistant' and '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\n') %}{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# family: (template, control tokens it adds, the BOS token, its end-of-turn tokens (generation_config's
# eos_token_id, the tokenizer's EOS first), whether it takes a system message)
CHAT = {
    "llama3": (
        LLAMA3_TEMPLATE,
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|begin_of_text|>",
        ["<|eot_id|>", "<|end_of_text|>"],
        True,
    ),
    "qwen2": (QWEN_TEMPLATE, [], None, ["<|im_end|>", "<|endoftext|>"], True),
    "qwen3": (QWEN3_TEMPLATE, [], None, ["<|im_end|>", "<|endoftext|>"], True),
    "gemma2": (GEMMA_TEMPLATE, ["<start_of_turn>", "<end_of_turn>"], "<bos>", ["<eos>", "<end_of_turn>"], False),
    "gemma3": (GEMMA_TEMPLATE, ["<start_of_turn>", "<end_of_turn>"], "<bos>", ["<eos>", "<end_of_turn>"], False),
    "phi3": (
        PHI3_TEMPLATE,
        ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"],
        "<s>",
        ["<|end|>", "</s>", "<|endoftext|>"],
        True,
    ),
    "mistral": (MISTRAL_TEMPLATE, [], "<s>", ["</s>"], False),
}
# The pre-tokenizer regexes of the real tokenizer.json files (as the Hub ships them, not llama.cpp's adaptation)
_SPLIT = {
    "llama3": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+",
}
_SPLIT["qwen3"] = _SPLIT["qwen2"]
_MODEL_CLASS = {
    "LlamaConfig": "LlamaForCausalLM",
    "Qwen2Config": "Qwen2ForCausalLM",
    "Qwen3Config": "Qwen3ForCausalLM",
    "Gemma2Config": "Gemma2ForCausalLM",
    "Gemma3TextConfig": "Gemma3ForCausalLM",
    "Phi3Config": "Phi3ForCausalLM",
    "MistralConfig": "MistralForCausalLM",
}


def _tokenizer(family: str, kind: str):
    """A transformers fast tokenizer of `kind` with `family`'s control tokens, BOS, EOS and chat template, and the
    SentencePiece model it was converted from (None for BPE)."""
    import transformers
    from tokenizers import processors

    template, controls, bos, eos, _ = CHAT[family]
    spm_model = None
    if kind == "bpe":  # byte-level BPE: ChatML's tokens are in its vocabulary (tiny_onnx.SPECIALS)
        fast = transformers.PreTrainedTokenizerFast(
            tokenizer_object=train_bpe(512, _SPLIT.get(family)), eos_token=eos[0], pad_token="<|endoftext|>"
        )
    else:
        spm_model = train_spm("gemma2" if kind == "gemma-spm" else "llama")
        with tempfile.TemporaryDirectory() as scratch:
            model_file = Path(scratch) / "tokenizer.model"
            model_file.write_bytes(spm_model)
            if kind == "gemma-spm":
                fast = transformers.GemmaTokenizerFast(vocab_file=str(model_file), from_slow=True)
            else:
                fast = transformers.LlamaTokenizerFast(
                    vocab_file=str(model_file), from_slow=True, legacy=True, add_prefix_space=True
                )
    fast.add_special_tokens({"additional_special_tokens": controls})
    fast.eos_token = eos[0]
    if fast.pad_token is None and "<|endoftext|>" in controls:  # Phi-3 pads with it
        fast.pad_token = "<|endoftext|>"
    if kind == "bpe" and bos:  # Llama 3's tokenizer writes its BOS before every text it encodes
        fast.bos_token = bos
        fast._tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, fast.convert_tokens_to_ids(bos))]
        )
    fast.chat_template = template
    return fast, spm_model


def make_family_model(family: str, directory: Path, *, seed: int = 0, shape: dict | None = None) -> Path:
    """`family`'s tiny stand-in saved as a Hugging Face directory (safetensors, config, tokenizer); `shape` sets
    other sizes (bench/models.py's 1B), its vocab_size at least the tokenizer's."""
    import torch
    import transformers

    config_class, distinct, kind = FAMILIES[family]
    tokenizer, spm_model = _tokenizer(family, kind)
    torch.manual_seed(seed)
    sizes = {**_SHAPE, **distinct, **(shape or {})}
    sizes["vocab_size"] = max(sizes.get("vocab_size", 0), len(tokenizer))
    config = getattr(transformers, config_class)(
        **sizes,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = getattr(transformers, _MODEL_CLASS[config_class])(config).eval()
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(CHAT[family][3])
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    if spm_model is not None:  # as a Hub repository ships it beside tokenizer.json
        (directory / "tokenizer.model").write_bytes(spm_model)
    (directory / "README.md").write_text(f"---\nlicense: apache-2.0\n---\n# tiny {family} for lmpack tests\n")
    return directory


# Encoders: (config class, model class, distinguishing values, tokenizer kind, sentence-transformers pooling)
ENCODERS = {
    # sentence-transformers/all-MiniLM-L6-v2, intfloat/e5-small-v2: BERT, WordPiece, mean pooling, normalised
    "bert": ("BertConfig", "BertModel", {}, "wordpiece", "mean"),
    # BAAI/bge-small-en-v1.5: BERT, WordPiece, the [CLS] vector, normalised
    "bge": ("BertConfig", "BertModel", {}, "wordpiece", "cls"),
    # intfloat/multilingual-e5-small: XLM-RoBERTa (positions offset past the padding id), SentencePiece unigram
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaModel", {"pad_token_id": 1}, "unigram-spm", "mean"),
}


def write_sentence_modules(directory: Path, *, pooling: str, normalize: bool, dimension: int) -> None:
    """modules.json and 1_Pooling/config.json as sentence-transformers saves them (a Normalize module if asked)."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (directory / "modules.json").write_text(json.dumps(modules, indent=2))
    modes = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "last": "pooling_mode_lasttoken"}
    settings = {"word_embedding_dimension": dimension, **{key: mode == pooling for mode, key in modes.items()}}
    (directory / "1_Pooling").mkdir(exist_ok=True)
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(settings, indent=2))


def _encoder_tokenizer(kind: str):
    import transformers
    from tiny_onnx import train_wordpiece

    if kind == "wordpiece":
        return transformers.BertTokenizerFast(
            tokenizer_object=train_wordpiece(600),
            unk_token="[UNK]",
            pad_token="[PAD]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
        )
    with tempfile.TemporaryDirectory() as scratch:
        model_file = Path(scratch) / "sentencepiece.bpe.model"
        model_file.write_bytes(train_spm("unigram"))
        return transformers.XLMRobertaTokenizerFast(vocab_file=str(model_file), from_slow=True)


def make_encoder_model(family: str, directory: Path, *, seed: int = 0) -> Path:
    """`family`'s tiny encoder saved with its tokenizer and sentence-transformers pipeline."""
    import torch
    import transformers

    config_class, model_class, distinct, kind, pooling = ENCODERS[family]
    tokenizer = _encoder_tokenizer(kind)
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=256,
        **distinct,
    )
    getattr(transformers, model_class)(config).eval().save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    write_sentence_modules(directory, pooling=pooling, normalize=True, dimension=64)
    return directory


# Qwen2.5-Instruct's chat template with tools (Hermes-style <tool_call> blocks, tool results as <tool_response>
# in a user turn), as its tokenizer_config.json ships it, for the tool-calling tests.
QWEN25_TOOLS_TEMPLATE = (Path(__file__).parent / "templates" / "qwen2.5-instruct-tools.jinja").read_text()


# Qwen2.5's syntax with a shorter preamble (tool names only): the tiny model's context is 512 positions, which
# Qwen2.5's own preamble with two tools' schemas nearly fills at its 512-token vocabulary. Qwen2.5's own template is
# checked against transformers' rendering below.
SHORT_TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools:{% for tool in tools %} {{ tool.function.name }}{% endfor %}."
    " Call one as <tool_call>{...}</tool_call><|im_end|>\n{% endif %}"
    "{%- for message in messages %}{%- if message.role == 'tool' %}"
    "{{- '<|im_start|>user\n<tool_response>\n' + message.content + '\n</tool_response><|im_end|>\n' }}"
    "{%- elif message.tool_calls %}{{- '<|im_start|>assistant' }}{%- for call in message.tool_calls %}"
    '{{- \'\n<tool_call>\n{"name": "\' + call.function.name + \'", "arguments": \' }}'
    "{{- call.function.arguments | tojson }}{{- '}\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
