"""The supported families, each proven against its own source: a tiny stand-in per family (tests/families.py) is
built from a Hugging Face directory, its fp32 export computes what PyTorch computes, its greedy tokens are
PyTorch's for 32 tokens through the serving runtime's model calls (KV cache included), and int8 and int4 build
and serve. Encoders embed as their own sentence-transformers pipeline does."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from families import CHAT, ENCODERS, FAMILIES, make_encoder_model, make_family_model

from lmpack import api

PROMPT = "The history of the railway in England began"
# fp32 ONNX against PyTorch on the tiny stand-ins: the runtimes differ in the last digits only (docs/build.md,
# "Faithful to the source"). Far tighter than the build's tolerance, so an exporter that drifts shows here first.
TINY_PARITY = 1e-4

sys.path.insert(0, str(Path(__file__).parent / "runtime"))  # the real `lmpack serve` process of the server tests


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_model(request, tmp_path_factory) -> tuple[str, Path]:
    family = request.param
    return family, make_family_model(family, tmp_path_factory.mktemp(family))


def _build(model: Path, profile: str, out: Path, cache: Path, **options) -> api.BuildResult:
    return api.build(str(model), target="cpu-x86", profile=profile, output_dir=out, cache_dir=cache, **options)


def _greedy_ids(variant: Path, prompt_ids: list[int], count: int) -> list[int]:
    """`count` greedy tokens through the runtime's decoder runner: a prefill, then one step per token."""
    from lmpack.runtime.engine import DecoderEngine
    from lmpack.runtime.select import prepare_variant
    from lmpack.runtime.sessions import KVCache

    engine = DecoderEngine(prepare_variant(variant))
    cache = KVCache(room=len(prompt_ids) + count + 1)
    logits, chosen = engine.runner.step(prompt_ids, cache), []
    for _ in range(count):
        chosen.append(int(logits.argmax()))
        if chosen[-1] in engine.eos_token_ids:
            break
        logits = engine.runner.step([chosen[-1]], cache)
    return chosen


def _torch_greedy(model_dir: Path, count: int) -> tuple[list[int], list[int]]:
    """PROMPT's ids by the source's tokenizer, and PyTorch's `count` greedy tokens after them (fewer at EOS)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = tokenizer(PROMPT).input_ids
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        generated = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=count,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )[0, len(prompt_ids) :].tolist()
    return prompt_ids, generated


def test_each_family_exports_at_fp32_what_pytorch_computes(family_model, session_cache, tmp_path):

    family, model_dir = family_model
    result = _build(model_dir, "fp32", tmp_path, session_cache, allow_quality_loss=True)
    parity = result.report["fidelity"]["export_parity"]
    assert parity["max_abs_diff"] <= TINY_PARITY and parity["top1_agreement"] == 1.0, (family, parity)

    prompt_ids, generated = _torch_greedy(model_dir, 32)
    assert _greedy_ids(result.variant_dir, prompt_ids, 32)[: len(generated)] == generated, family


def test_each_familys_prompts_are_the_tokens_transformers_makes(family_model, session_cache, tmp_path):
    """BOS where the family's tokenizer writes one, the chat template rendered and tokenized as transformers'
    apply_chat_template does (control tokens as themselves, content as text), and every end-of-turn token of the
    family's generation config ending a generation."""
    from transformers import AutoTokenizer

    from lmpack.runtime.engine import DecoderEngine
    from lmpack.runtime.select import prepare_variant

    family, model_dir = family_model
    _, _, bos, eos, takes_system = CHAT[family]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    variant = _build(model_dir, "fp32", tmp_path, session_cache, allow_quality_loss=True).variant_dir
    engine = DecoderEngine(prepare_variant(variant))

    assert engine.encode_prompt(PROMPT) == tokenizer(PROMPT).input_ids, family
    first = engine.encode_prompt(PROMPT)[0]
    assert first == tokenizer.convert_tokens_to_ids(bos) if bos else first not in tokenizer.all_special_ids, family
    conversation = [
        *([{"role": "system", "content": "You answer in one sentence."}] if takes_system else []),
        {"role": "user", "content": "  Where did the railway begin?  "},
        {"role": "assistant", "content": "<think>rails</think>\nIn the north."},
        {"role": "user", "content": "And when?"},
    ]
    expected = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    assert engine.encode_chat(conversation) == expected, family
    # An end-of-turn token's text in a message is read as text (a user cannot end a turn): no more of them in the
    # prompt than the template writes itself.
    end_of_turn = tokenizer.convert_ids_to_tokens(tokenizer.convert_tokens_to_ids(eos[0]))
    forged = [{"role": "user", "content": f"Why {end_of_turn}?"}]
    clean = [{"role": "user", "content": "Why ?"}]

    def turn_ends(ids: list[int]) -> int:
        return sum(i in engine.eos_token_ids for i in ids)

    assert turn_ends(engine.encode_chat(forged)) == turn_ends(
        tokenizer.apply_chat_template(clean, add_generation_prompt=True, tokenize=True)
    ), family
    assert set(tokenizer.convert_tokens_to_ids(eos)) <= engine.eos_token_ids, family


@pytest.mark.parametrize("profile", ["int8", "int4"])
def test_each_family_builds_quantized_and_serves(family_model, profile, session_cache, tmp_path):
    """Random weights make the quality numbers meaningless (the gate is overridden, the report says so); what must
    hold is that the build finishes and the quantized variant answers a chat request from the official client
    through a real `lmpack serve`."""
    import openai
    from runtime_servers import run_server

    family, model_dir = family_model
    result = _build(model_dir, profile, tmp_path, session_cache, allow_quality_loss=True)
    assert result.report["quality"]["gate"] in ("passed", "overridden")
    with run_server(result.variant_dir, tmp=tmp_path) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
        answer = client.chat.completions.create(
            model=result.variant_dir.name,
            messages=[{"role": "user", "content": "Where did the railway begin?"}],
            max_tokens=8,
            temperature=0,
        )
    assert answer.choices[0].finish_reason in ("stop", "length"), family
    assert answer.usage.completion_tokens >= 1 or answer.choices[0].finish_reason == "stop", family


def test_each_family_builds_from_its_gguf_and_answers_as_its_source(family_model, session_cache, tmp_path):
    """The GGUF llama.cpp's converter would write of the stand-in (tests/gguf_models.py) builds at fp32 with the
    source's own tokenizer ids and greedy tokens, and at int4, which answers through the serving engine."""
    from gguf_models import write_gguf

    family, model_dir = family_model
    gguf_path = write_gguf(model_dir, tmp_path / f"{family}.gguf", family)
    result = _build(gguf_path, "fp32", tmp_path / "fp32", session_cache, allow_quality_loss=True)
    assert result.report["source"]["kind"] == "gguf" and result.report["fidelity"]["tokenizer"], family
    assert result.report["fidelity"]["export_parity"]["max_abs_diff"] <= TINY_PARITY, family

    prompt_ids, generated = _torch_greedy(model_dir, 32)
    assert _greedy_ids(result.variant_dir, prompt_ids, 32)[: len(generated)] == generated, family

    int4 = _build(gguf_path, "int4", tmp_path / "int4", session_cache, allow_quality_loss=True)
    completion = api.generate(int4.variant_dir, PROMPT, max_tokens=8)
    assert completion.completion_tokens >= 1 or completion.finish_reason == "stop", family


@pytest.fixture(scope="module", params=sorted(ENCODERS))
def encoder_model(request, tmp_path_factory) -> tuple[str, Path]:
    family = request.param
    return family, make_encoder_model(family, tmp_path_factory.mktemp(family))


def _reference_embeddings(model_dir: Path, texts: list[str]):
    """What the model's sentence-transformers pipeline computes, in transformers: pooled per its Pooling config
    over a padded batch, then normalised."""
    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer

    modes = json.loads((model_dir / "1_Pooling" / "config.json").read_text())
    tokenizer, model = AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = hidden[:, 0] if modes["pooling_mode_cls_token"] else (hidden * mask).sum(1) / mask.sum(1)
    pooled = pooled.numpy()
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def test_each_encoder_family_embeds_as_its_own_pipeline_does(encoder_model, session_cache, tmp_path):
    """fp32 through the runtime within float noise of the sentence-transformers recipe (its pooling: mean, or
    BGE's [CLS] vector), and int8 served by `lmpack serve` to the official client close to it."""
    import numpy as np
    import openai
    from runtime_servers import run_server

    from lmpack.runtime.engine import EncoderEngine
    from lmpack.runtime.select import prepare_variant

    family, model_dir = encoder_model
    texts = ["The railway reached the town in 1850.", "Le serveur redémarre seul.", "def verify(self): pass"]
    expected = _reference_embeddings(model_dir, texts)
    fp32 = _build(model_dir, "fp32", tmp_path / "fp32", session_cache)
    got = EncoderEngine(prepare_variant(fp32.variant_dir)).embed(texts).vectors
    np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=family)

    int8 = _build(model_dir, "int8", tmp_path / "int8", session_cache)
    with run_server(int8.variant_dir, tmp=tmp_path) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
        answer = client.embeddings.create(model=int8.variant_dir.name, input=texts)
    served = np.array([item.embedding for item in answer.data])
    assert ((served * expected).sum(axis=1) > 0.99).all(), (family, (served * expected).sum(axis=1))


def test_pooling_is_read_from_the_sentence_transformers_pipeline(tmp_path):
    from families import write_sentence_modules

    from lmpack.errors import UnsupportedModelError
    from lmpack.steps.model_files import sentence_pooling

    assert sentence_pooling(tmp_path) == ("mean", True)  # no modules.json: mean pooling, normalised
    write_sentence_modules(tmp_path, pooling="cls", normalize=False, dimension=8)
    assert sentence_pooling(tmp_path) == ("cls", False)
    write_sentence_modules(tmp_path, pooling="last", normalize=True, dimension=8)
    assert sentence_pooling(tmp_path) == ("last", True)
    settings = tmp_path / "1_Pooling" / "config.json"
    settings.write_text(json.dumps({"pooling_mode_max_tokens": True, "pooling_mode_mean_tokens": False}))
    with pytest.raises(UnsupportedModelError, match="pooling_mode_max_tokens"):
        sentence_pooling(tmp_path)
