"""logprobs, top_logprobs, echo, token-id prompts and logit_bias against a real `lmpack serve`, checked against
the model's own full-window logits."""

from __future__ import annotations

import math

import numpy as np
import openai
import pytest

from lmpack.runtime.engine import DecoderEngine
from lmpack.runtime.logprobs import log_softmax
from lmpack.runtime.sampling import SamplingParams
from lmpack.runtime.variant import load_variant

MESSAGES = [{"role": "user", "content": "Which railway opened in 1825?"}]
# int8 variants quantize activations per pass, so one window and a token at a time differ in the last digits
TOLERANCE = 0.02


@pytest.fixture(scope="module")
def engine(llama_variant) -> DecoderEngine:
    return DecoderEngine(load_variant(llama_variant), threads=1)


@pytest.fixture(scope="module")
def client(llama_server):
    return openai.OpenAI(base_url=f"{llama_server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def reference(engine: DecoderEngine, ids: list[int]) -> list[float]:
    """Each token's logprob given those before it, from one full-window pass (the first has none)."""
    values = log_softmax(engine.runner.logits(np.asarray(ids)))
    return [float(values[i - 1, ids[i]]) for i in range(1, len(ids))]


def test_chat_logprobs_are_the_models_own(client, engine, llama_variant):
    response = client.chat.completions.create(
        model=llama_variant.name, messages=MESSAGES, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3
    )
    choice = response.choices[0]
    content = choice.logprobs.content
    assert len(content) == response.usage.completion_tokens
    assert "".join(entry.token for entry in content) == choice.message.content
    for entry in content:
        tops = [top.logprob for top in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and tops[0] <= 0
        assert entry.top_logprobs[0].token == entry.token and entry.logprob == pytest.approx(tops[0])  # greedy
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token
    ids = engine.encode_chat(MESSAGES)
    alone = engine.generate(ids, SamplingParams(max_tokens=12, temperature=0, logprobs=0))
    assert alone.result().text == choice.message.content
    chosen = [entry.token for entry in alone.decoding.logprobs]
    expected = reference(engine, ids + chosen)[len(ids) - 1 :]
    assert [entry.logprob for entry in content] == pytest.approx(expected, abs=TOLERANCE)


def test_a_streamed_answer_carries_the_same_logprobs(client, llama_variant):
    kwargs = dict(model=llama_variant.name, messages=MESSAGES, max_tokens=12, temperature=0, logprobs=True)
    whole = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    streamed = [
        entry
        for chunk in client.chat.completions.create(stream=True, **kwargs)
        if chunk.choices and chunk.choices[0].logprobs
        for entry in chunk.choices[0].logprobs.content
    ]
    assert [(e.token, e.top_logprobs) for e in streamed] == [(e.token, []) for e in whole]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in whole], abs=1e-6)


def test_loglikelihood_as_lm_evaluation_harness_asks_for_it(llama_server, engine):
    """lm-eval's `local-completions`: token ids of context + continuation, echo, logprobs 1, max_tokens 1; it sums
    token_logprobs[len(context):-1] and calls the continuation greedy when each is its position's top logprob."""
    context = engine.encode_prompt("The railway opened in")
    continuation = engine.tokenizer.encode(" 1825 with a steam engine", add_special_tokens=False).ids
    ids = context + continuation
    body = {"prompt": [ids], "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True, "seed": 1234}
    with llama_server.client() as http:
        choice = http.post("/v1/completions", json=body).json()["choices"][0]
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(ids) + 1
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert choice["text"].startswith(engine.tokenizer.decode(ids, skip_special_tokens=False))
    assert logprobs["text_offset"][0] == 0 and logprobs["text_offset"] == sorted(logprobs["text_offset"])
    scored = logprobs["token_logprobs"][len(context) : -1]
    expected = reference(engine, ids)[len(context) - 1 :]
    assert sum(scored) == pytest.approx(sum(expected), abs=TOLERANCE * len(expected))
    greedy = all(
        score == max(top.values())
        for score, top in zip(scored, logprobs["top_logprobs"][len(context) : -1], strict=True)
    )
    values = log_softmax(engine.runner.logits(np.asarray(ids)))
    assert greedy == all(int(np.argmax(values[i - 1])) == ids[i] for i in range(len(context), len(ids)))
    assert all(math.isfinite(v) and v <= 0 for v in scored)


def tokens_of(server, **body) -> list[int]:
    with server.client() as http:
        return http.post("/tokenize", json=body).json()["tokens"]


def test_logit_bias_moves_the_choice(client, llama_server, llama_variant):
    def first_tokens(**extra):
        response = client.completions.create(
            model=llama_variant.name, prompt="The railway", max_tokens=3, temperature=0, logprobs=0, **extra
        )
        return response.choices[0].logprobs.tokens

    free = first_tokens()
    forced = tokens_of(llama_server, content="zebra")[0]
    biased = first_tokens(logit_bias={str(forced): 100})
    assert biased[0] != free[0] and all(token == biased[0] for token in biased)
    banned = tokens_of(llama_server, content=free[0])[0]
    assert first_tokens(logit_bias={str(banned): -100})[0] != free[0]


def test_a_token_id_prompt_is_answered_as_its_text(client, llama_server, llama_variant):
    text = "Once upon a time"
    ids = tokens_of(llama_server, prompt=text)
    by_text = client.completions.create(model=llama_variant.name, prompt=text, max_tokens=8, temperature=0)
    by_ids = client.completions.create(model=llama_variant.name, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    with pytest.raises(openai.BadRequestError, match="not in the vocabulary"):
        client.completions.create(model=llama_variant.name, prompt=[10**8], max_tokens=2)
