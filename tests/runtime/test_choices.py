"""n > 1: several choices of one prompt from one prefill, each reproducible by its own seed."""

from __future__ import annotations

import pytest

PROMPT = "Once upon a time there was"


def test_n_choices_are_each_the_answer_their_seed_gives(llama_server):
    with llama_server.client() as http:
        body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 1.0, "seed": 40}
        many = http.post("/v1/completions", json={**body, "n": 3, "logprobs": 0}).json()
        alone = [
            http.post("/v1/completions", json={**body, "seed": 40 + i}).json()["choices"][0]["text"] for i in range(3)
        ]
    assert [c["index"] for c in many["choices"]] == [0, 1, 2]
    assert [c["text"] for c in many["choices"]] == alone
    assert len(set(alone)) > 1  # the seeds differ, so the choices do
    assert many["usage"]["completion_tokens"] == sum(len(c["logprobs"]["tokens"]) for c in many["choices"])


def test_chat_choices_and_greedy_ones_agree(llama_server):
    with llama_server.client() as http:
        body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 12, "temperature": 0, "n": 2}
        answer = http.post("/v1/chat/completions", json=body).json()
    first, second = (c["message"]["content"] for c in answer["choices"])
    assert first == second and [c["index"] for c in answer["choices"]] == [0, 1]


@pytest.mark.parametrize(
    ("fields", "param"),
    [({"n": 0}, "n"), ({"n": 2.5}, "n"), ({"n": 10_000}, "n"), ({"n": 10_000, "stream": True}, "n")],
)
def test_bad_n_is_a_400(llama_server, fields, param):
    with llama_server.client() as http:
        response = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, **fields})
    assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_streamed_choices_interleave_and_each_is_whole(llama_server):
    import json

    body = {"prompt": PROMPT, "max_tokens": 20, "temperature": 1.0, "seed": 7, "n": 3}
    with llama_server.client() as http:
        whole = http.post("/v1/completions", json=body).json()
        with http.stream(
            "POST", "/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}
        ) as response:
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    texts, finishes = ["", "", ""], {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            texts[choice["index"]] += choice["text"]
            if choice["finish_reason"]:
                finishes[choice["index"]] = choice["finish_reason"]
    assert texts == [c["text"] for c in whole["choices"]]
    assert finishes == {c["index"]: c["finish_reason"] for c in whole["choices"]}
    assert chunks[-1]["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"]
