"""Shared fixtures: tiny random models made on the spot (a few layers, a tokenizer trained on lmpack's text)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _train_bpe(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from lmpack.steps.validate import eval_text

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([eval_text()], trainer=trainer)
    return tokenizer


def _train_wordpiece(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    from lmpack.steps.validate import eval_text

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size,
                                        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tokenizer.train_from_iterator([eval_text()], trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tokenizer.token_to_id("[CLS]")), ("[SEP]", tokenizer.token_to_id("[SEP]"))])
    return tokenizer


def make_tiny_llama(directory: Path, *, layers: int = 4, seed: int = 0) -> Path:
    """A 4-layer Llama with tied embeddings, trained for a few seconds on lmpack's text so it predicts like an LM."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    tokenizer = _train_bpe(512)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                         pad_token_id=fast.pad_token_id)
    model = LlamaForCausalLM(config)
    _train(model, tokenizer)
    model.save_pretrained(directory, safe_serialization=True)
    fast.save_pretrained(directory)
    (directory / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny llama for lmpack tests\n")
    return directory


def _train(model, tokenizer, steps: int = 120) -> None:
    """Memorise the evaluation text a little: peaked predictions make quantization effects realistic."""
    import torch

    from lmpack.steps.validate import eval_text

    ids = torch.tensor(tokenizer.encode(eval_text()).ids)
    windows = ids[: len(ids) // 128 * 128].reshape(-1, 128)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for step in range(steps):
        batch = windows[(step * 4) % len(windows):][:4]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def make_tiny_bert(directory: Path, *, seed: int = 0) -> Path:
    import torch
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    tokenizer = _train_wordpiece(600)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    config = BertConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=256)
    BertModel(config).eval().save_pretrained(directory, safe_serialization=True)
    fast.save_pretrained(directory)
    (directory / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": "",
                                                          "type": "sentence_transformers.models.Transformer"}]))
    return directory


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    """One step cache for the session, so the tiny exports are made once."""
    return tmp_path_factory.mktemp("lmpack-cache")


@pytest.fixture(scope="session")
def llama_variant(tiny_llama, session_cache, tmp_path_factory) -> Path:
    """The tiny Llama built for cpu-x86 int8: what the runtime and agent tests serve."""
    from lmpack import api

    out = tmp_path_factory.mktemp("variants")
    return api.build(str(tiny_llama), target="cpu-x86", profile="int8", output_dir=out,
                     cache_dir=session_cache).variant_dir


@pytest.fixture(scope="session")
def llama_variant_optimum(tiny_llama, session_cache, tmp_path_factory) -> Path:
    """The same, exported with optimum instead of onnxruntime-genai's builder (left-padded batches)."""
    from lmpack import api

    out = tmp_path_factory.mktemp("variants-optimum")
    profile = (REPO / "profiles" / "int8.toml").read_text()
    profile = profile.replace('name = "int8"', 'name = "int8-optimum"').replace(
        '[[steps]]\nname = "export"\n', '[[steps]]\nname = "export"\nexporter = "optimum"\n')
    assert 'exporter = "optimum"' in profile
    (out / "int8-optimum.toml").write_text(profile)
    return api.build(str(tiny_llama), target="cpu-x86", profile=str(out / "int8-optimum.toml"), output_dir=out,
                     cache_dir=session_cache).variant_dir


@pytest.fixture
def model_copy(tiny_llama, tmp_path):
    """An editable copy of tiny_llama: model_copy("name", files={"onnx/model.onnx": b"..."}, drop=("config.json",))."""

    def copy(name: str, *, files: dict[str, bytes | str] | None = None, drop: tuple[str, ...] = ()) -> Path:
        directory = shutil.copytree(tiny_llama, tmp_path / name)
        for relpath in drop:
            (directory / relpath).unlink()
        for relpath, content in (files or {}).items():
            target = directory / relpath
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content)
        return directory

    return copy


@pytest.fixture
def lmpack_cli():
    """Run the lmpack CLI in this process; the result keeps stdout and stderr apart."""
    from click.testing import CliRunner

    from lmpack.cli.main import cli

    return lambda *args: CliRunner().invoke(cli, [str(arg) for arg in args])


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """No test reads or writes the real user configuration or cache."""
    monkeypatch.setenv("LMPACK_HOME", str(tmp_path / "lmpack-home"))
    monkeypatch.setenv("LMPACK_CACHE", str(tmp_path / "lmpack-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))


@pytest.fixture
def fake_hub(isolated_home, monkeypatch):
    """A local Hugging Face Hub (tests/hub_server.py) that huggingface_hub uses, in this process and in children."""
    from hub_server import FakeHub

    with FakeHub() as hub:
        hub.install(monkeypatch)
        yield hub
