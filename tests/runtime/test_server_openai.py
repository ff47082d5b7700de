"""The official openai client against a real `lmpack serve` process: chat, streaming, completions, embeddings."""

from __future__ import annotations

import json

import numpy as np
import openai
import pytest
from click.testing import CliRunner
from runtime_servers import run_server

from lmpack.cli.main import cli

QUESTION = "Which railway opened in 1825?"


@pytest.fixture(scope="module")
def client(llama_server):
    return openai.OpenAI(base_url=f"{llama_server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def generate_cli(variant, prompt, *flags) -> dict:
    result = CliRunner().invoke(cli, ["generate", str(variant), prompt, "--json", "--threads", "1", *flags])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_models_lists_the_variant(client, llama_variant):
    models = client.models.list()
    assert [m.id for m in models.data] == [llama_variant.name]
    assert client.models.retrieve(llama_variant.name).id == llama_variant.name


def test_chat_completion_greedy_equals_lmpack_generate(client, llama_variant):
    response = client.chat.completions.create(
        model=llama_variant.name, temperature=0, max_tokens=24, messages=[{"role": "user", "content": QUESTION}]
    )
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    local = generate_cli(llama_variant, QUESTION, "--chat", "--max-tokens", "24")
    assert choice.message.content == local["text"]
    assert response.usage.prompt_tokens == local["usage"]["prompt_tokens"]
    assert response.usage.completion_tokens == local["usage"]["completion_tokens"]
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_streaming_chat_delivers_the_same_text_in_pieces(client, llama_variant):
    kwargs = dict(
        model=llama_variant.name, temperature=0, max_tokens=24, messages=[{"role": "user", "content": QUESTION}]
    )
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals in (["stop"], ["length"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_completion_greedy_equals_lmpack_generate(client, llama_variant):
    prompt = "The history of the railway in England began"
    response = client.completions.create(model=llama_variant.name, prompt=prompt, max_tokens=20, temperature=0)
    local = generate_cli(llama_variant, prompt, "--max-tokens", "20")
    assert response.choices[0].text == local["text"] != ""
    assert response.choices[0].finish_reason == local["finish_reason"]
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=llama_variant.name, prompt=prompt, max_tokens=20, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == local["text"]


def test_seeded_sampling_is_reproducible_and_stop_cuts(client, llama_variant):
    kwargs = dict(model=llama_variant.name, prompt="The railway", max_tokens=24, temperature=0.9, seed=5)
    first, second = (client.completions.create(**kwargs).choices[0].text for _ in range(2))
    assert first == second
    greedy = (
        client.completions.create(model=llama_variant.name, prompt="The railway", max_tokens=24, temperature=0)
        .choices[0]
        .text
    )
    stop = greedy.strip()[:3]
    cut = client.completions.create(
        model=llama_variant.name, prompt="The railway", max_tokens=24, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == greedy[: greedy.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_bad_requests_raise_the_clients_typed_errors(client, llama_variant):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=llama_variant.name, messages=[{"role": "user", "content": "x"}], n=100)
    assert info.value.body["param"] == "n"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])


def test_embeddings_from_an_encoder_variant(bert_variant, tmp_path):
    from lmpack.runtime.engine import EncoderEngine
    from lmpack.runtime.variant import load_variant

    texts = ["The railway reached Darlington.", "Steam engines pulled the coal wagons."]
    with run_server(bert_variant, tmp=tmp_path) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        response = client.embeddings.create(model=bert_variant.name, input=texts)  # base64 on the wire
        as_floats = server.client().post("/v1/embeddings", json={"input": texts, "encoding_format": "float"}).json()
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=bert_variant.name, messages=[{"role": "user", "content": "x"}])
        assert refused.value.body["code"] == "wrong_model_task"
        tokenize = server.client().post("/tokenize", json={"prompt": "x"})
        assert tokenize.status_code == 400 and tokenize.json()["error"]["code"] == "wrong_model_task"
        assert server.client().get("/v1/models").json()["data"][0]["max_model_len"] > 0
    vectors = np.array([d.embedding for d in response.data])
    expected = EncoderEngine(load_variant(bert_variant), threads=1).embed(texts).vectors
    assert vectors.shape == (2, 64)
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    np.testing.assert_allclose(np.array([d["embedding"] for d in as_floats["data"]]), expected, atol=1e-5)
    assert response.usage.prompt_tokens == as_floats["usage"]["prompt_tokens"] > 4


def test_a_request_that_sets_no_sampling_field_gets_the_models_defaults(client, llama_server, llama_variant, tmp_path):
    """The tiny model's generation config sets no sampling field: the server uses the documented chat defaults,
    lists them in /v1/models and says them when it starts; a request that leaves them out is sampled with
    them. A generation config that sets some wins for those, OpenAI's neutral values for the rest."""
    import shutil

    from lmpack.runtime.engine import CHAT_SAMPLING_DEFAULTS, DecoderEngine
    from lmpack.runtime.sampling import SamplingParams
    from lmpack.runtime.variant import load_variant

    engine = DecoderEngine(load_variant(llama_variant), threads=1)
    assert engine.defaults() == CHAT_SAMPLING_DEFAULTS
    assert client.models.retrieve(llama_variant.name).model_extra["sampling_defaults"] == CHAT_SAMPLING_DEFAULTS
    assert "temperature=0.8, top_p=0.95, top_k=40" in llama_server.log.read_text()
    answer = client.completions.create(model=llama_variant.name, prompt=QUESTION, max_tokens=24, seed=11)
    local = engine.generate(
        engine.encode_prompt(QUESTION), SamplingParams(max_tokens=24, seed=11, **CHAT_SAMPLING_DEFAULTS)
    )
    assert answer.choices[0].text == local.result().text

    copy = tmp_path / "v"
    shutil.copytree(llama_variant, copy)
    config = copy / "model" / "generation_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "temperature": 0.3}))
    configured = DecoderEngine(load_variant(copy), threads=1)
    assert configured.defaults() == {"temperature": 0.3, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}
    assert configured.defaults_source == "the model's generation_config.json"
