"""Tool calling against a real `lmpack serve` of the tiny model with a Qwen2.5-style chat template: required and named
calls enforced, a round trip with the tool's result, streamed call deltas, and the model's syntax parsed."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from families import QWEN25_TOOLS_TEMPLATE, SHORT_TOOLS_TEMPLATE

from lmpack.runtime.chat import ChatTemplate
from lmpack.runtime.tools import ToolStream, parse_calls, syntax_of

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,  # as OpenAI's strict tools have it: a random model invents no keys
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}},
            "additionalProperties": False,
        },
    },
}
QUESTION = [{"role": "user", "content": "What is the weather in Lisbon?"}]


@pytest.fixture(scope="module")
def client(tool_server):
    return openai.OpenAI(base_url=f"{tool_server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _arguments(call, tool) -> dict:
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, tool["function"]["parameters"])
    return arguments


def test_a_required_call_and_the_next_turn_with_its_result(client, tool_variant):
    first = client.chat.completions.create(
        model=tool_variant.name,
        messages=QUESTION,
        tools=[WEATHER, CLOCK],
        tool_choice="required",
        parallel_tool_calls=False,  # a random model would add calls until its budget ran out
        max_tokens=200,
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls
    assert calls and all(call.type == "function" and call.id.startswith("call_") for call in calls)
    assert all(call.function.name in ("get_weather", "get_time") for call in calls)
    _arguments(calls[0], WEATHER if calls[0].function.name == "get_weather" else CLOCK)

    history = [
        *QUESTION,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": calls[0].id, "content": '{"temperature": 21}'},
    ]
    second = client.chat.completions.create(
        model=tool_variant.name, messages=history, tools=[WEATHER, CLOCK], max_tokens=8, temperature=0
    )
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert second.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result are in the prompt


def test_a_named_choice_calls_that_function(client, tool_variant):
    for seed in range(3):
        response = client.chat.completions.create(
            model=tool_variant.name,
            messages=QUESTION,
            tools=[WEATHER, CLOCK],
            tool_choice={"type": "function", "function": {"name": "get_time"}},
            parallel_tool_calls=False,
            max_tokens=100,
            seed=seed,
        )
        calls = response.choices[0].message.tool_calls
        assert [call.function.name for call in calls] == ["get_time"] * len(calls)
        _arguments(calls[0], CLOCK)


def test_streamed_calls_arrive_as_deltas(client, tool_variant):
    chunks = list(
        client.chat.completions.create(
            model=tool_variant.name,
            messages=QUESTION,
            tools=[WEATHER],
            tool_choice="required",
            parallel_tool_calls=False,
            max_tokens=200,
            stream=True,
        )
    )
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].index == 0 and deltas[0].function.name == "get_weather"
    _arguments(deltas[0], WEATHER)
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)  # no call text leaks
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_none_and_auto_answer_in_text_when_no_call_is_made(client, tool_variant):
    for choice in ("none", "auto"):
        response = client.chat.completions.create(
            model=tool_variant.name, messages=QUESTION, tools=[WEATHER], tool_choice=choice, max_tokens=6, temperature=0
        )
        message = response.choices[0].message
        assert message.tool_calls is None and message.content


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": {"a": 1}}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]},
            "tools[0].function.parameters",
        ),
    ],
)
def test_bad_tools_are_400_naming_the_field(client, tool_variant, fields, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=tool_variant.name, messages=QUESTION, max_tokens=4, **fields)
    assert caught.value.body["param"] == param


def test_a_template_without_tools_is_a_clear_400(llama_server, llama_variant):
    with llama_server.client() as http:
        response = http.post(
            "/v1/chat/completions", json={"messages": QUESTION, "tools": [WEATHER], "tool_choice": "required"}
        )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "tools" and error["code"] == "tools_not_supported"


# The syntaxes, without a model ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("syntax", "text", "content", "calls"),
    [
        (
            "hermes",
            'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Porto"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
            "Let me look.",
            [("get_weather", {"city": "Porto"}), ("get_time", {})],
        ),
        ("mistral", '[TOOL_CALLS] [{"name": "get_time", "arguments": {"zone": 1}}]', None, [("get_time", {"zone": 1})]),
        ("json", '{"name": "get_weather", "parameters": {"city": "Oslo"}}', None, [("get_weather", {"city": "Oslo"})]),
        ("json", "The weather is fine.", "The weather is fine.", []),
        ("hermes", '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>', None, []),  # not offered
        ("hermes", "<tool_call>\n{not json\n</tool_call>", None, []),
    ],
)
def test_calls_are_read_in_each_syntax(syntax, text, content, calls):
    got_content, got = parse_calls(text, syntax, ["get_weather", "get_time"])
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls
    assert got_content == (content if calls else text)


def test_a_stream_holds_back_only_what_may_be_a_call():
    stream = ToolStream("hermes", ["get_time"])
    shown = "".join(
        stream.push(piece)
        for piece in ["Sure", ". <tool", "_call>\n", '{"name": "get_time", ', '"arguments": {}}\n</tool_call>']
    )
    rest, calls = stream.finish()
    assert shown == "Sure. " and rest == "" and [c.name for c in calls] == ["get_time"]
    plain = ToolStream("hermes", ["get_time"])
    assert "".join(plain.push(p) for p in ["a <b", "c> d"]) + plain.finish()[0] == "a <bc> d"


def test_syntax_is_read_from_the_template():
    assert syntax_of(QWEN25_TOOLS_TEMPLATE) == syntax_of(SHORT_TOOLS_TEMPLATE) == "hermes"
    assert syntax_of("{{ '[TOOL_CALLS]' }}{{ tools }}") == "mistral"
    assert syntax_of("{{ tools | tojson }}") == "json"
    assert ChatTemplate(QWEN25_TOOLS_TEMPLATE).supports_tools
    assert not ChatTemplate("{% for m in messages %}{{ m.content }}{% endfor %}").supports_tools


def test_tools_are_rendered_as_transformers_renders_them():
    transformers = pytest.importorskip("transformers")
    from tiny_onnx import train_bpe

    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=train_bpe(300), eos_token="<|im_end|>")
    fast.chat_template = QWEN25_TOOLS_TEMPLATE
    history = [
        *QUESTION,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Lisbon"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
    ]
    ours = ChatTemplate(QWEN25_TOOLS_TEMPLATE).render(history, tools=[WEATHER, CLOCK])
    # transformers takes the arguments as an object, which is what lmpack hands the template
    theirs_history = json.loads(json.dumps(history))
    theirs_history[1]["tool_calls"][0]["function"]["arguments"] = {"city": "Lisbon"}
    theirs_history[1]["content"] = ""
    theirs = fast.apply_chat_template(
        theirs_history, tools=[WEATHER, CLOCK], tokenize=False, add_generation_prompt=True
    )
    assert ours == theirs
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lisbon"}}\n</tool_call>' in ours
