"""/tokenize and /detokenize on a real `lmpack serve`, in vLLM's and llama.cpp's shapes; max_model_len."""

from __future__ import annotations

import pytest

TEXT = "The Stockton and Darlington Railway opened in 1825, hauled by Locomotion No. 1."
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Which railway opened in 1825?"}]


@pytest.fixture(scope="module")
def http(llama_server):
    with llama_server.client() as client:
        yield client


def test_a_prompts_count_is_what_a_completion_is_given(http, llama_variant):
    counted = http.post("/tokenize", json={"prompt": TEXT, "return_token_strs": True}).json()
    used = http.post("/v1/completions", json={"prompt": TEXT, "max_tokens": 1}).json()["usage"]["prompt_tokens"]
    context = http.get(f"/v1/models/{llama_variant.name}").json()["max_model_len"]
    assert counted["count"] == len(counted["tokens"]) == used
    assert counted["max_model_len"] == context > used
    assert len(counted["token_strs"]) == used and all(isinstance(s, str) for s in counted["token_strs"])


def test_messages_are_counted_through_the_chat_template(http):
    counted = http.post("/tokenize", json={"messages": MESSAGES}).json()
    answer = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1}).json()
    assert counted["count"] == answer["usage"]["prompt_tokens"]
    text = http.post("/detokenize", json={"tokens": counted["tokens"]}).json()["prompt"]
    assert "Which railway opened in 1825?" in text and "Be brief." in text


def test_llama_cpps_shape_round_trips(http):
    plain = http.post("/tokenize", json={"content": TEXT}).json()
    assert set(plain) == {"tokens"} and all(isinstance(t, int) for t in plain["tokens"])
    pieces = http.post("/tokenize", json={"content": TEXT, "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == plain["tokens"]
    assert "".join(p["piece"] for p in pieces) == TEXT
    assert http.post("/detokenize", json={"tokens": plain["tokens"]}).json()["content"] == TEXT


def test_control_token_text_is_text_unless_asked(http):
    as_text = http.post("/tokenize", json={"prompt": "<|im_end|>"}).json()["tokens"]
    as_token = http.post("/tokenize", json={"prompt": "<|im_end|>", "parse_special_tokens": True}).json()["tokens"]
    assert len(as_text) > len(as_token)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": "a", "content": "a"}, "prompt"),
        ("/tokenize", {"prompt": 3}, "prompt"),
        ("/tokenize", {"content": "a", "add_special": "yes"}, "add_special"),
        ("/tokenize", {"messages": "hi"}, "messages"),
        ("/detokenize", {"tokens": [1, 10**9]}, "tokens"),
        ("/detokenize", {"tokens": [-1]}, "tokens"),
        ("/detokenize", {"tokens": "abc"}, "tokens"),
        ("/detokenize", {}, "tokens"),
    ],
)
def test_bad_bodies_are_400_naming_the_field(http, path, body, param):
    response = http.post(path, json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
