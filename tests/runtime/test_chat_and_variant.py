"""Chat templates run sandboxed; variant directories are checked before anything loads."""

from __future__ import annotations

import json
import shutil

import pytest

from lmpack.bundle.variant_dir import TEXT_GENERATION
from lmpack.errors import NotFoundError, RequestError, VariantError
from lmpack.runtime.chat import ChatTemplate, normalize_messages
from lmpack.runtime.variant import load_variant


def test_the_models_template_renders_a_conversation(llama_variant):
    variant = load_variant(llama_variant)
    assert variant.task == TEXT_GENERATION and variant.name == llama_variant.name
    assert variant.eos_token_ids and variant.context_length == 512
    template = ChatTemplate(variant.chat_template)
    text = template.render(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    )
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_templates_cannot_reach_python_internals():
    template = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(RequestError) as info:
        template.render([{"role": "user", "content": "x"}])
    assert info.value.param == "messages"
    mutating = ChatTemplate("{% set _ = messages.append({'role': 'x'}) %}{{ messages | length }}")
    with pytest.raises(RequestError):
        mutating.render([{"role": "user", "content": "x"}])


def test_raise_exception_in_a_template_is_a_bad_request():
    template = ChatTemplate(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok"
    )
    assert template.render([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(RequestError, match="first must be user"):
        template.render([{"role": "assistant", "content": "x"}])


@pytest.mark.parametrize(
    "messages, param",
    [
        ([], "messages"),
        ("hi", "messages"),
        ([{"role": "wizard", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": 3}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "messages[0].content"),
    ],
)
def test_bad_messages_name_the_field(messages, param):
    with pytest.raises(RequestError) as info:
        normalize_messages(messages)
    assert info.value.param == param


def test_variant_problems_name_the_file(llama_variant, tmp_path):
    with pytest.raises(NotFoundError):
        load_variant(tmp_path / "missing")
    with pytest.raises(VariantError, match="neither variant.json nor lmpack-model.json"):
        load_variant(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(llama_variant, broken)
    (broken / "model" / "tokenizer.json").unlink()
    with pytest.raises(VariantError, match="tokenizer.json"):
        load_variant(broken)
    info = broken / "model" / "lmpack-model.json"
    info.write_text(json.dumps({**json.loads(info.read_text()), "task": "translation"}))
    with pytest.raises(VariantError, match="task 'translation'"):
        load_variant(broken)
    assert load_variant(llama_variant / "model").name == "model"  # a bare model directory loads too


def test_an_encoders_pooling_must_be_one_the_runtime_computes(bert_variant, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(bert_variant, broken)
    info = broken / "model" / "lmpack-model.json"
    info.write_text(json.dumps({**json.loads(info.read_text()), "pooling": "max"}))
    with pytest.raises(VariantError, match="pooling 'max' is not one of mean, cls, last"):
        load_variant(broken)


def test_the_chat_template_may_live_in_tokenizer_config(llama_variant, tmp_path):
    copy = tmp_path / "v"
    shutil.copytree(llama_variant, copy)
    template = (copy / "model" / "chat_template.jinja").read_text()
    (copy / "model" / "chat_template.jinja").unlink()
    config_path = copy / "model" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": template}]
    config_path.write_text(json.dumps(config))
    assert load_variant(copy).chat_template == template
    del config["chat_template"]
    config_path.write_text(json.dumps(config))
    assert load_variant(copy).chat_template is None
