"""Shared fixtures: tiny random models made on the spot (a few layers, a tokenizer trained on lmpack's text)."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest
from families import write_sentence_modules
from tiny_onnx import CHAT_TEMPLATE, train_bpe, train_wordpiece, write_decoder_variant, write_encoder_variant

from lmpack.data import all_eval_text

REPO = Path(__file__).resolve().parents[1]


def _build_half_installed() -> bool:
    """The build extra's libraries are importable, and the run was not asked to act as a runtime-only install."""
    if os.environ.get("LMPACK_TEST_RUNTIME_ONLY") == "1":
        return False
    return all(importlib.util.find_spec(name) for name in ("torch", "transformers", "optimum", "onnxruntime_genai"))


# Without the build half (an install of the runtime extra, as on a server), the runtime, bundle and agent tests
# serve variants written with onnx's helpers (tests/tiny_onnx.py) instead of ones lmpack builds.
RUNTIME_ONLY = not _build_half_installed()


def make_tiny_llama(directory: Path, *, layers: int = 4, seed: int = 0) -> Path:
    """A 4-layer Llama with tied embeddings, trained for a few seconds on lmpack's text so it predicts like an LM."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    tokenizer = train_bpe(512)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    _train(model, tokenizer)
    model.save_pretrained(directory, safe_serialization=True)
    fast.save_pretrained(directory)
    (directory / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny llama for lmpack tests\n")
    return directory


def _train(model, tokenizer, steps: int = 120) -> None:
    """Memorise the evaluation text a little: peaked predictions make quantization effects realistic."""
    import torch

    ids = torch.tensor(tokenizer.encode(all_eval_text()).ids)
    windows = ids[: len(ids) // 128 * 128].reshape(-1, 128)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for step in range(steps):
        batch = windows[(step * 4) % len(windows) :][:4]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def make_tiny_bert(directory: Path, *, seed: int = 0) -> Path:
    import torch
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    tokenizer = train_wordpiece(600)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    config = BertConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=256,
    )
    BertModel(config).eval().save_pretrained(directory, safe_serialization=True)
    fast.save_pretrained(directory)
    write_sentence_modules(directory, pooling="mean", normalize=True, dimension=64)  # all-MiniLM-L6-v2's pipeline
    return directory


def _needs_build_half() -> None:
    if RUNTIME_ONLY:
        pytest.skip("needs the build extra (torch, transformers, the exporters); this is a runtime-only run")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    _needs_build_half()
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    _needs_build_half()
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    """One step cache for the session, so the tiny exports are made once."""
    return tmp_path_factory.mktemp("lmpack-cache")


def _build(request, model_fixture: str, out: Path, profile: str = "int8", target: str = "cpu-x86") -> Path:
    """The tiny model of `model_fixture` built for `target` with `profile` into `out`, through the session's cache."""
    from lmpack import api

    model, cache = request.getfixturevalue(model_fixture), request.getfixturevalue("session_cache")
    return api.build(str(model), target=target, profile=profile, output_dir=out, cache_dir=cache).variant_dir


def _build_int8_with(request, out: Path, name: str, after: str, line: str) -> Path:
    """The tiny Llama built with a copy of the int8 profile named `name`, with `line` added after `after`."""
    profile = (REPO / "profiles" / "int8.toml").read_text()
    assert after in profile, after
    profile = profile.replace('name = "int8"', f'name = "{name}"').replace(after, after + line)
    (out / f"{name}.toml").write_text(profile)
    return _build(request, "tiny_llama", out, profile=str(out / f"{name}.toml"))


@pytest.fixture(scope="session")
def llama_variant(request, tmp_path_factory) -> Path:
    """The tiny Llama built for cpu-x86 int8 (onnxruntime-genai's graph, right-padded batches): what the runtime,
    bundle and agent tests serve. Runtime-only: a decoder of that layout written with onnx's helpers."""
    out = tmp_path_factory.mktemp("variants")
    if RUNTIME_ONLY:
        return write_decoder_variant(out / "tiny-llama-cpu-x86-int8", layout="right")
    return _build(request, "tiny_llama", out)


@pytest.fixture(scope="session")
def bert_variant(request, tmp_path_factory) -> Path:
    """The tiny BERT built for cpu-x86 int8 (an embedding model); runtime-only: one written with onnx's helpers."""
    out = tmp_path_factory.mktemp("variants")
    if RUNTIME_ONLY:
        return write_encoder_variant(out / "tiny-bert-cpu-x86-int8")
    return _build(request, "tiny_bert", out)


@pytest.fixture(scope="session")
def llama_variant_optimum(request, tmp_path_factory) -> Path:
    """The same, exported with optimum instead of onnxruntime-genai's builder (left-padded batches)."""
    out = tmp_path_factory.mktemp("variants-optimum")
    if RUNTIME_ONLY:
        return write_decoder_variant(out / "tiny-llama-int8-optimum", layout="left")
    return _build_int8_with(request, out, "int8-optimum", '[[steps]]\nname = "export"\n', 'exporter = "optimum"\n')


@pytest.fixture(scope="session")
def llama_variant_fp16_kv(request, tmp_path_factory) -> Path:
    """The tiny Llama's int8 variant with its KV cache in fp16 (the quantize step's kv_cache = "fp16")."""
    out = tmp_path_factory.mktemp("variants-fp16-kv")
    if RUNTIME_ONLY:
        return write_decoder_variant(out / "tiny-llama-int8-fp16-kv", layout="right", kv_cache="fp16")
    return _build_int8_with(request, out, "int8-fp16-kv", "embedding_bits = 8\n", 'kv_cache = "fp16"\n')


@pytest.fixture(scope="session")
def cpu_fp16_target(tmp_path_factory) -> Path:
    """cpu-x86 with fp16 allowed: onnxruntime's CPU provider runs fp16 graphs, so the fp16 path builds here."""
    shipped = (REPO / "targets" / "cpu-x86.toml").read_text()
    target = tmp_path_factory.mktemp("targets") / "cpu-fp16.toml"
    target.write_text(
        shipped.replace('name = "cpu-x86"', 'name = "cpu-fp16"').replace(
            'precisions = ["fp32", "int8", "int4"]', 'precisions = ["fp32", "fp16", "int8"]'
        )
    )
    return target


@pytest.fixture(scope="session")
def llama_variant_gpu_graph(request, tmp_path_factory) -> Path:
    """The tiny Llama built for an NVIDIA target (a100 int4): onnxruntime-genai's CUDA graph, fp16 activations and
    KV cache, which the CPU provider runs too. Runtime-only: a right-padded decoder with an fp16 cache."""
    out = tmp_path_factory.mktemp("variants-gpu-graph")
    if RUNTIME_ONLY:
        return write_decoder_variant(out / "tiny-llama-a100-int4", layout="right", kv_cache="fp16")
    return _build(request, "tiny_llama", out, profile="int4", target="a100")


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
