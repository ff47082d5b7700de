"""The libraries applications build on, unchanged, against a real `lmpack serve` on loopback: LangChain's ChatOpenAI
(bind_tools, with_structured_output) and instructor. The tiny model with a Qwen-syntax template: its answers are
well formed only because lmpack constrains them, which is what these libraries rely on."""

from __future__ import annotations

import json

import openai
import pydantic
import pytest

instructor = pytest.importorskip("instructor")
langchain_openai = pytest.importorskip("langchain_openai")


class City(pydantic.BaseModel):
    """The weather in a city now."""

    model_config = pydantic.ConfigDict(extra="forbid")  # additionalProperties false: nothing invented
    city: str = pydantic.Field(max_length=12)
    unit: str = pydantic.Field(pattern="^(celsius|fahrenheit)$")


class Person(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    name: str = pydantic.Field(max_length=10)
    age: int = pydantic.Field(ge=0, le=120)


QUESTION = "What is the weather in Lisbon?"


@pytest.fixture(scope="module")
def chat(tool_server, tool_variant):
    return langchain_openai.ChatOpenAI(
        base_url=f"{tool_server.url}/v1", api_key="unused", model=tool_variant.name, max_tokens=200, max_retries=0
    )


def test_langchain_bind_tools_gets_a_parsed_call(chat):
    bound = chat.bind_tools([City], tool_choice="City", strict=True, parallel_tool_calls=False)
    message = bound.invoke(QUESTION)
    assert [call["name"] for call in message.tool_calls] == ["City"]
    City.model_validate(message.tool_calls[0]["args"])
    assert message.response_metadata["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output_returns_the_model(chat, method):
    structured = chat.with_structured_output(Person, method=method, strict=True)
    person = structured.invoke("Describe a person.")
    assert isinstance(person, Person)


@pytest.mark.parametrize("mode", ["JSON_SCHEMA", "TOOLS"])
def test_instructor_returns_a_validated_model(tool_server, tool_variant, mode):
    client = instructor.from_openai(
        openai.OpenAI(base_url=f"{tool_server.url}/v1", api_key="unused", max_retries=0, timeout=120),
        mode=getattr(instructor.Mode, mode),
    )
    person = client.chat.completions.create(
        model=tool_variant.name,
        response_model=Person,
        messages=[{"role": "user", "content": "Describe a person."}],
        max_tokens=200,
        max_retries=1,
    )
    assert isinstance(person, Person) and 0 <= person.age <= 120


def test_the_raw_requests_are_what_lmpack_enforces(tool_server, tool_variant):
    """What the libraries send is the documented API: a named tool_choice and a strict json_schema."""
    client = openai.OpenAI(base_url=f"{tool_server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    answer = client.chat.completions.create(
        model=tool_variant.name,
        messages=[{"role": "user", "content": QUESTION}],
        tools=[{"type": "function", "function": {"name": "City", "parameters": City.model_json_schema()}}],
        tool_choice={"type": "function", "function": {"name": "City"}},
        parallel_tool_calls=False,
        max_tokens=200,
    )
    call = answer.choices[0].message.tool_calls[0]
    assert call.function.name == "City" and City.model_validate(json.loads(call.function.arguments))
