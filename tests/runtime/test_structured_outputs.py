"""response_format: JSON schemas enforced by llguidance, alone, in batches, over HTTP and through the openai client."""

from __future__ import annotations

import json
import threading
from typing import Annotated

import jsonschema
import numpy as np
import openai
import pydantic
import pytest
from runtime_servers import run_server

from lmpack.errors import RequestError
from lmpack.runtime.engine import DecoderEngine
from lmpack.runtime.grammar import grammar_for
from lmpack.runtime.sampling import SamplingParams
from lmpack.runtime.variant import load_variant

# Bounded in every direction, so a random-weight model sampling freely still closes the document.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["engineer", "poet", "doctor"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "zip": {"pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "address", "active"],
    "additionalProperties": False,
}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


@pytest.fixture(scope="module")
def engine(llama_variant) -> DecoderEngine:
    return DecoderEngine(load_variant(llama_variant), threads=1)


def _generate(engine: DecoderEngine, response_format, **params):
    ids = engine.encode_prompt("Tell me about a person:")
    return engine.generate(ids, SamplingParams(grammar=grammar_for(response_format), **params)).result()


@pytest.mark.parametrize("seed", range(8))
def test_sampled_output_always_parses_and_validates(engine, seed):
    result = _generate(engine, PERSON_FORMAT, max_tokens=300, temperature=1.0, seed=seed)
    assert result.finish_reason == "stop"
    jsonschema.validate(json.loads(result.text), PERSON)


def test_without_a_format_the_same_request_is_free_text(engine):
    constrained = _generate(engine, PERSON_FORMAT, max_tokens=40, temperature=0)
    free = _generate(engine, None, max_tokens=40, temperature=0)
    text = _generate(engine, {"type": "text"}, max_tokens=40, temperature=0)
    assert free.text == text.text
    assert constrained.text.startswith('{"name": "') and not free.text.startswith("{")


def test_the_mask_follows_the_grammar_token_by_token(engine):
    constraint = engine.grammars.constraint(grammar_for({"type": "json_object"}))
    document = '{"a": [1, 2], "b": "x"}'
    ids = engine.tokenizer.encode(document, add_special_tokens=False).ids
    flat = np.zeros(engine.tokenizer.get_vocab_size(), dtype=np.float32)  # every token equally likely
    assert constraint.mask(flat)[engine.tokenizer.token_to_id("}")] == -np.inf  # no closing before opening
    for token in ids:
        logits = constraint.mask(flat)
        assert logits[token] == 0, f"the grammar refused {engine.tokenizer.id_to_token(token)!r} of a valid document"
        assert not constraint.finished
        constraint.accept(token)
    assert constraint.finished  # the object is closed: nothing more may follow


@pytest.mark.parametrize(
    ("response_format", "param"),
    [
        ({"type": "xml"}, "response_format.type"),
        ("json", "response_format"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        ({"type": "json_schema", "json_schema": {"schema": PERSON}}, "response_format.json_schema.name"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": []}}, "response_format.json_schema.schema"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}, "schema"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}, "schema"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"pattern": "(("}}}, "schema"),
    ],
)
def test_a_bad_format_is_refused_naming_the_field(response_format, param):
    with pytest.raises(RequestError) as caught:
        grammar_for(response_format)
    assert caught.value.param.endswith(param)


# Over HTTP -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(llama_variant, tmp_path_factory):
    with run_server(
        llama_variant, "--max-concurrency", "4", "--max-batch", "4", tmp=tmp_path_factory.mktemp("structured")
    ) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


class Address(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=10)
    zip: str = pydantic.Field(pattern="^[0-9]{5}$")


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)
    age: int = pydantic.Field(ge=0, le=120)
    tags: list[Annotated[str, pydantic.Field(max_length=5)]] = pydantic.Field(max_length=3)
    address: Address


def test_openai_clients_parse_gets_a_pydantic_object(client, llama_variant):
    for seed in range(3):
        completion = client.chat.completions.parse(
            model=llama_variant.name,
            messages=[{"role": "user", "content": "Describe a person."}],
            response_format=Person,
            max_tokens=400,
            seed=seed,
        )
        message = completion.choices[0].message
        assert completion.choices[0].finish_reason == "stop"
        assert isinstance(message.parsed, Person), message.content
        assert Person.model_validate_json(message.content) == message.parsed


def test_a_streamed_answer_is_the_same_document(client, llama_variant):
    kwargs = dict(
        model=llama_variant.name,
        messages=[{"role": "user", "content": "A person, please."}],
        response_format=PERSON_FORMAT,
        max_tokens=300,
        temperature=0,
    )
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole
    jsonschema.validate(json.loads(streamed), PERSON)


def test_constrained_and_free_requests_share_a_batch_undisturbed(server, engine):
    prompt = "Once upon a time there was"
    free_alone = _generate(engine, None, max_tokens=60, temperature=0).text
    jobs = [{"prompt": "Tell me about a person:", "max_tokens": 60, "temperature": 0}] + [
        {"prompt": prompt, "max_tokens": 300, "temperature": 1.0, "seed": seed, "response_format": PERSON_FORMAT}
        for seed in range(3)
    ]
    answers: list = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def post(i):
        with server.client() as http:
            barrier.wait()
            answers[i] = http.post("/v1/completions", json=jobs[i]).json()

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert answers[0]["choices"][0]["text"] == free_alone
    for answer in answers[1:]:
        assert answer["choices"][0]["finish_reason"] == "stop"
        jsonschema.validate(json.loads(answer["choices"][0]["text"]), PERSON)


def test_a_bad_schema_is_a_400_in_openais_shape(client, llama_variant):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=llama_variant.name,
            messages=[{"role": "user", "content": "hi"}],
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
        )
    error = caught.value.body
    assert error["param"] == "response_format.json_schema.schema" and "nonsense" in error["message"]
