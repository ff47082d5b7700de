"""Tiny variants written with onnx's helpers and the tokenizers library: no torch, no exporter.

The runtime, bundle and agent tests serve these on an install of the `runtime` extra alone (plus the `dev`
extra, which brings `onnx` to write them), so a build-only import in the runtime fails there. The decoders
have the two KV layouts lmpack's exporters produce (lmpack-model.json `kv_padding`):

- "right": onnxruntime-genai's shape, GroupQueryAttention (com.microsoft) with the cache written in place;
- "left": optimum's shape, plain ONNX attention over an attention mask, presents concatenated.

Weights are random (seeded), the end-of-sequence and other special tokens (and bytes that are not printable
ASCII) can never be chosen, so greedy generations run to max_tokens and read as text; the tokenizers are
trained on lmpack's shipped evaluation text.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lmpack.data import all_eval_text

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2: pad, bos, eos
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONTEXT = 512
_HIDDEN, _HEADS, _KV_HEADS = 64, 4, 2


def train_bpe(vocab_size: int, split: str | None = None):
    """A byte-level BPE tokenizer (SmolLM2's kind) trained on lmpack's text, with the ChatML special tokens. With
    `split`, text is first split by that regex (as Llama 3's and Qwen2's tokenizer.json do), not GPT-2's."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = (
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        if split
        else pre_tokenizers.ByteLevel(add_prefix_space=False)
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([all_eval_text()], trainer=trainer)
    return tokenizer


def train_wordpiece(vocab_size: int):
    """A BERT WordPiece tokenizer trained on lmpack's text, adding [CLS] and [SEP]."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    )
    tokenizer.train_from_iterator([all_eval_text()], trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tokenizer.token_to_id("[CLS]")), ("[SEP]", tokenizer.token_to_id("[SEP]"))],
    )
    return tokenizer


class _Graph:
    """Nodes and seeded random initializers of one graph."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list = []
        self.inits: list = []
        self._count = 0

    def weight(self, name: str, shape: tuple[int, ...], scale: float) -> str:
        return self.const(name, self.rng.normal(0.0, scale, shape).astype(np.float32))

    def const(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, **attrs) -> str | list[str]:
        from onnx import helper

        names = outputs if isinstance(outputs, list) else [f"t{self._count}_{i}" for i in range(outputs)]
        self._count += 1
        domain = "com.microsoft" if op_type == "GroupQueryAttention" else ""
        self.nodes.append(helper.make_node(op_type, inputs, names, domain=domain, **attrs))
        return names[0] if len(names) == 1 else names

    def save(self, path: Path, name: str, inputs: list, outputs: list, *, contrib: bool) -> None:
        import onnx
        from onnx import helper

        opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid("com.microsoft", 1)] if contrib else [])
        model = helper.make_model(
            helper.make_graph(self.nodes, name, inputs, outputs, self.inits), opset_imports=opsets, ir_version=8
        )
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=1024,
        )


def _tensor(name: str, elem: int, dims: list):
    from onnx import helper

    return helper.make_tensor_value_info(name, elem, dims)


def _decoder(path: Path, *, vocab: int, layers: int, layout: str, banned: list[int], seed: int) -> None:
    from onnx import TensorProto

    g = _Graph(seed)
    head_dim = _HIDDEN // _HEADS
    kv_heads = _KV_HEADS if layout == "right" else _HEADS  # the plain-ONNX attention does not group heads
    one, axis1 = g.const("one", np.array(1, np.int64)), g.const("axis1", np.array([1], np.int64))
    bias = np.zeros(vocab, np.float32)
    bias[banned] = -1e4  # never chosen: generations run to max_tokens
    inputs = [
        _tensor("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        _tensor("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
    ]
    x = g.op("Gather", [g.weight("embed", (vocab, _HIDDEN), 1.0), "input_ids"])
    if layout == "right":
        total_per_row = g.op("ReduceSum", ["attention_mask", axis1], keepdims=0)
        seqlens = g.op("Cast", [g.op("Sub", [total_per_row, one])], to=TensorProto.INT32)
        total = g.op("Cast", [g.op("Gather", [g.op("Shape", ["attention_mask"]), one], axis=0)], to=TensorProto.INT32)
        positions = np.arange(CONTEXT)[:, None] / (10000 ** (np.arange(0, head_dim, 2) / head_dim))[None, :]
        cos, sin = (
            g.const("cos_cache", np.cos(positions).astype(np.float32)),
            g.const("sin_cache", np.sin(positions).astype(np.float32)),
        )
    else:
        inputs.append(_tensor("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]))
        x = g.op("Add", [x, g.op("Gather", [g.weight("positions", (CONTEXT, _HIDDEN), 1.0), "position_ids"])])
        mask = _left_mask(g, one)
    outputs = [_tensor("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", vocab])]
    for layer in range(layers):
        past = [f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"]
        present = [f"present.{layer}.key", f"present.{layer}.value"]
        inputs += [
            _tensor(n, TensorProto.FLOAT, ["batch_size", kv_heads, "past_sequence_length", head_dim]) for n in past
        ]
        outputs += [
            _tensor(n, TensorProto.FLOAT, ["batch_size", kv_heads, "total_sequence_length", head_dim]) for n in present
        ]
        scale = 1.0 / np.sqrt(_HIDDEN)
        if layout == "right":
            qkv = g.op("MatMul", [x, g.weight(f"qkv{layer}", (_HIDDEN, (_HEADS + 2 * kv_heads) * head_dim), scale)])
            attended = g.op(
                "GroupQueryAttention",
                [qkv, "", "", *past, seqlens, total, cos, sin],
                [f"attn{layer}", *present],
                num_heads=_HEADS,
                kv_num_heads=kv_heads,
                scale=float(1 / np.sqrt(head_dim)),
                do_rotary=1,
            )[0]
        else:
            attended = _plain_attention(g, x, layer, past, present, mask, head_dim, scale)
        x = g.op("Add", [x, g.op("MatMul", [attended, g.weight(f"o{layer}", (_HIDDEN, _HIDDEN), scale)])])
    if layout == "right":  # as lmpack's export gives the builder's graph: the head for the last positions only
        inputs.append(_tensor("num_logits_to_keep", TensorProto.INT64, [1]))
        x = g.op("Slice", [x, g.op("Neg", ["num_logits_to_keep"]), g.const("end", np.array([2**62], np.int64)), axis1])
    head = g.op("MatMul", [x, g.weight("lm_head", (_HIDDEN, vocab), 2.0 / np.sqrt(_HIDDEN))])
    g.op("Add", [head, g.const("lm_bias", bias)], ["logits"])
    g.save(path, "tiny-decoder", inputs, outputs, contrib=layout == "right")


def _halve_kv_cache(path: Path) -> None:
    import onnx

    from lmpack.steps.kv_cache import kv_cache_fp16

    model = onnx.load(str(path))
    kv_cache_fp16(model)
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data"
    )


def _left_mask(g: _Graph, one: str) -> str:
    """[batch, 1, new, total] additive mask: 0 where a new position may attend (causal, not padding), else -1e9."""
    from onnx import TensorProto

    zero = g.const("zero", np.array(0, np.int64))
    total = g.op("Gather", [g.op("Shape", ["attention_mask"]), one], axis=0)
    new = g.op("Gather", [g.op("Shape", ["input_ids"]), one], axis=0)
    first = g.op("Sub", [total, new])
    keys = g.op("Unsqueeze", [g.op("Range", [zero, total, one]), g.const("axis0", np.array([0], np.int64))])
    queries = g.op(
        "Unsqueeze", [g.op("Add", [g.op("Range", [zero, new, one]), first]), g.const("axis1b", np.array([1], np.int64))]
    )
    causal = g.op("LessOrEqual", [keys, queries])
    padding = g.op(
        "Unsqueeze",
        [g.op("Cast", ["attention_mask"], to=TensorProto.BOOL), g.const("axes12", np.array([1, 2], np.int64))],
    )
    allowed = g.op("And", [causal, padding])
    return g.op(
        "Where", [allowed, g.const("open", np.array(0.0, np.float32)), g.const("shut", np.array(-1e9, np.float32))]
    )


def _plain_attention(
    g: _Graph, x: str, layer: int, past: list[str], present: list[str], mask: str, head_dim: int, scale: float
) -> str:
    heads = g.const(f"heads{layer}", np.array([0, 0, _HEADS, head_dim], np.int64))

    def split(name: str) -> str:
        projected = g.op("MatMul", [x, g.weight(f"{name}{layer}", (_HIDDEN, _HIDDEN), scale)])
        return g.op("Transpose", [g.op("Reshape", [projected, heads])], perm=[0, 2, 1, 3])

    query = split("q")
    keys = g.op("Concat", [past[0], split("k")], [present[0]], axis=2)
    values = g.op("Concat", [past[1], split("v")], [present[1]], axis=2)
    scores = g.op(
        "Mul",
        [
            g.op("MatMul", [query, g.op("Transpose", [keys], perm=[0, 1, 3, 2])]),
            g.const(f"scale{layer}", np.array(1 / np.sqrt(head_dim), np.float32)),
        ],
    )
    weights = g.op("Softmax", [g.op("Add", [scores, mask])], axis=-1)
    context = g.op("Transpose", [g.op("MatMul", [weights, values])], perm=[0, 2, 1, 3])
    return g.op("Reshape", [context, g.const(f"merge{layer}", np.array([0, 0, _HIDDEN], np.int64))])


def _encoder(path: Path, *, vocab: int, seed: int) -> None:
    from onnx import TensorProto

    g = _Graph(seed)
    one = g.const("one", np.array(1, np.int64))
    zero = g.const("zero", np.array(0, np.int64))
    length = g.op("Gather", [g.op("Shape", ["input_ids"]), one], axis=0)
    positions = g.op("Range", [zero, length, one])
    x = g.op(
        "Add",
        [
            g.op("Gather", [g.weight("embed", (vocab, _HIDDEN), 1.0), "input_ids"]),
            g.op("Gather", [g.weight("positions", (CONTEXT, _HIDDEN), 1.0), positions]),
        ],
    )
    x = g.op("Add", [x, g.op("Gather", [g.weight("types", (2, _HIDDEN), 1.0), "token_type_ids"])])
    mixed = g.op("Tanh", [g.op("MatMul", [x, g.weight("mix", (_HIDDEN, _HIDDEN), 1 / np.sqrt(_HIDDEN))])])
    g.op("Add", [x, mixed], ["last_hidden_state"])
    inputs = [
        _tensor(n, TensorProto.INT64, ["batch_size", "sequence_length"])
        for n in ("input_ids", "attention_mask", "token_type_ids")
    ]
    outputs = [_tensor("last_hidden_state", TensorProto.FLOAT, ["batch_size", "sequence_length", _HIDDEN])]
    g.save(path, "tiny-encoder", inputs, outputs, contrib=False)


def _printable(text: str) -> bool:
    return bool(text) and text.isascii() and (text.isprintable() or text.strip() == "")


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True))


def _finish_variant(root: Path, model: Path, *, task: str) -> Path:
    """variant.json and the report beside `model`, as lmpack build writes them (cpu-x86, int8)."""
    from lmpack.bundle.variant_dir import variant_document, write_variant
    from lmpack.config.targets import load_target

    target = load_target("cpu-x86")
    document = variant_document(
        name=root.name,
        target=target.to_dict(),
        profile="int8",
        precision="int8",
        execution_providers=target.execution_providers,
        task=task,
        model_digest=f"tiny-onnx:{root.name}",
    )
    report = {
        "schema_version": 1,
        "source": {"kind": "directory", "ref": "tests/tiny_onnx.py", "license": "apache-2.0"},
        "task": task,
        "built_at": "2026-01-01T00:00:00+00:00",
        "target": target.name,
        "profile": "int8",
    }
    root.mkdir(parents=True)
    write_variant(root, model=model, document=document, report=report, report_text="written by tests/tiny_onnx.py\n")
    return root


def write_decoder_variant(
    root: Path, *, layout: str = "right", layers: int = 2, seed: int = 0, kv_cache: str = "fp32"
) -> Path:
    """A text-generation variant directory at `root` (which must not exist) with the given KV layout; kv_cache
    "fp16" rewrites the right-padded graph as the quantize step does (lmpack.steps.kv_cache)."""
    tokenizer = train_bpe(512)
    vocab = tokenizer.get_vocab_size()
    # special tokens, and byte tokens that are not printable ASCII on their own, are never generated
    banned = [i for i in range(vocab) if i < len(SPECIALS) or not _printable(tokenizer.decode([i]))]
    model = root.parent / f".{root.name}-model"
    model.mkdir(parents=True)
    _decoder(model / "model.onnx", vocab=vocab, layers=layers, layout=layout, banned=banned, seed=seed)
    if kv_cache == "fp16":
        _halve_kv_cache(model / "model.onnx")
    tokenizer.save(str(model / "tokenizer.json"))
    _write_json(
        model / "tokenizer_config.json",
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    )
    (model / "chat_template.jinja").write_text(CHAT_TEMPLATE)  # where transformers writes it now
    _write_json(
        model / "config.json",
        {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "max_position_embeddings": CONTEXT,
            "eos_token_id": 2,
            "bos_token_id": 1,
            "vocab_size": vocab,
        },
    )
    _write_json(model / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
    _write_json(
        model / "lmpack-model.json",
        {
            "schema_version": 1,
            "task": "text-generation",
            "onnx": "model.onnx",
            "kv_padding": layout,
            "exporter": "tests/tiny_onnx.py",
            "max_position_embeddings": CONTEXT,
            "num_layers": layers,
            "num_kv_heads": _KV_HEADS if layout == "right" else _HEADS,
            "head_dim": _HIDDEN // _HEADS,
            "vocab_size": vocab,
        },
    )
    return _finish_variant(root, model, task="text-generation")


def write_encoder_variant(root: Path, *, seed: int = 0) -> Path:
    """A feature-extraction (embedding) variant directory at `root`, which must not exist."""
    tokenizer = train_wordpiece(600)
    model = root.parent / f".{root.name}-model"
    model.mkdir(parents=True)
    _encoder(model / "model.onnx", vocab=tokenizer.get_vocab_size(), seed=seed)
    tokenizer.save(str(model / "tokenizer.json"))
    _write_json(
        model / "tokenizer_config.json",
        {
            "pad_token": "[PAD]",
            "unk_token": "[UNK]",
            "cls_token": "[CLS]",
            "sep_token": "[SEP]",
            "model_max_length": CONTEXT,
        },
    )
    _write_json(
        model / "config.json",
        {
            "architectures": ["BertModel"],
            "model_type": "bert",
            "max_position_embeddings": CONTEXT,
            "hidden_size": _HIDDEN,
        },
    )
    _write_json(
        model / "lmpack-model.json",
        {
            "schema_version": 1,
            "task": "feature-extraction",
            "onnx": "model.onnx",
            "exporter": "tests/tiny_onnx.py",
            "pooling": "mean",
            "normalize": True,
            "hidden_size": _HIDDEN,
        },
    )
    return _finish_variant(root, model, task="feature-extraction")
