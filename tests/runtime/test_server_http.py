"""Raw HTTP against a real server: content type, size cap, field bounds, keys, overload, health, metrics."""

from __future__ import annotations

import concurrent.futures
import gzip
import json
import time

import httpx
import pytest
from runtime_servers import run_server, serve_in_thread

from lmpack.config.serve import ServeSettings
from lmpack.runtime.engine import DecoderEngine
from lmpack.runtime.sampling import SamplingParams
from lmpack.runtime.server import create_app
from lmpack.runtime.variant import load_variant

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Hello"}]


def chat(client: httpx.Client, **fields) -> httpx.Response:
    return client.post(CHAT, json={"messages": MESSAGES, "max_tokens": 4, **fields})


def assert_error(response: httpx.Response, status: int, *, param=None, code=None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def test_json_only(llama_server):
    with llama_server.client() as client:
        assert_error(
            client.post(CHAT, content=b"messages=hi", headers={"content-type": "text/plain"}),
            415,
            code="unsupported_media_type",
        )
        assert_error(client.post(CHAT, content=b"{}"), 415)  # no content type at all
        body = gzip.compress(json.dumps({"messages": MESSAGES}).encode())
        assert_error(
            client.post(CHAT, content=body, headers={"content-type": "application/json", "content-encoding": "gzip"}),
            415,
        )
        assert_error(
            client.post(CHAT, content=b"{not json", headers={"content-type": "application/json"}),
            400,
            code="invalid_json",
        )
        assert_error(client.post(CHAT, json=[1, 2]), 400, code="invalid_json")


def test_body_size_is_capped(llama_server):
    big = {"messages": [{"role": "user", "content": "x" * (2 * 1024 * 1024 + 10)}]}
    with llama_server.client() as client:
        assert_error(client.post(CHAT, json=big), 413, code="request_too_large")

        def chunks():  # no Content-Length: the cap must hold while reading
            yield b'{"messages": [{"role": "user", "content": "'
            for _ in range(300):
                yield b"y" * 10_000
            yield b'"}]}'

        assert_error(client.post(CHAT, content=chunks(), headers={"content-type": "application/json"}), 413)


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"max_completion_tokens": -1}, "max_completion_tokens"),
        ({"max_tokens": "ten"}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -3}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"n": 0}, "n"),
        ({"n": 1000}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": 7}, "stop"),
        ({"seed": "abc"}, "seed"),
        ({"stream": "yes"}, "stream"),
        ({"presence_penalty": 9}, "presence_penalty"),
        ({"logprobs": "yes"}, "logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"echo": True}, "echo"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"messages": None}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": {"a": 1}}]}, "messages[0].content"),
    ],
)
def test_each_bad_field_is_named(llama_server, fields, param):
    with llama_server.client() as client:
        body = {"messages": MESSAGES, "max_tokens": 4, **fields}
        if body["messages"] is None:
            del body["messages"]
        error = assert_error(client.post(CHAT, json=body), 400, param=param)
        assert error["type"] == "invalid_request_error"


def test_completions_fields_and_context(llama_server):
    with llama_server.client() as client:
        assert_error(client.post("/v1/completions", json={"max_tokens": 2}), 400, param="prompt")
        assert_error(client.post("/v1/completions", json={"prompt": 5}), 400, param="prompt")
        long_prompt = "railway " * 600  # well past the tiny model's 512 positions
        assert_error(
            client.post("/v1/completions", json={"prompt": long_prompt, "max_tokens": 4}),
            400,
            param="prompt",
            code="context_length_exceeded",
        )
        assert_error(
            client.post("/v1/completions", json={"prompt": "railway " * 100, "max_tokens": 500}),
            400,
            param="max_tokens",
            code="context_length_exceeded",
        )
        assert_error(client.post("/v1/completions", json={"prompt": "x", "model": "other"}), 404, param="model")
        assert_error(client.post("/v1/embeddings", json={"input": "x"}), 400, code="wrong_model_task")
        assert_error(client.get("/v1/nothing"), 404)
        assert_error(client.get(CHAT), 405)


def test_health_and_metrics(llama_server):
    with llama_server.client() as client:
        for path in ("/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready"):
            assert client.get(path).status_code == 200, path
        assert chat(client).status_code == 200
        assert_error(chat(client, temperature=7), 400)
        metrics = client.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'lmpack_requests_total{code="200",route="/v1/chat/completions"}' in text
    assert 'lmpack_requests_total{code="400",route="/v1/chat/completions"}' in text
    assert 'lmpack_request_duration_seconds_bucket{le="0.5",route="/v1/chat/completions"}' in text
    generated = next(line for line in text.splitlines() if line.startswith("lmpack_generated_tokens_total"))
    assert float(generated.split()[-1]) >= 4


def test_api_keys_from_file_and_environment(llama_variant, tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text("# operators\nfile-key-123456\n")
    with (
        run_server(
            llama_variant, "--api-key-file", str(key_file), tmp=tmp_path, env={"LMPACK_API_KEYS": "env-key-abcdef"}
        ) as server,
        server.client() as client,
    ):
        assert_error(chat(client), 401, code="invalid_api_key")
        assert_error(
            client.post(CHAT, json={"messages": MESSAGES}, headers={"authorization": "Bearer wrong-key-000"}), 401
        )
        assert_error(client.get("/v1/models", headers={"authorization": "Basic file-key-123456"}), 401)
        for key in ("file-key-123456", "env-key-abcdef"):
            response = client.post(
                CHAT, json={"messages": MESSAGES, "max_tokens": 2}, headers={"authorization": f"Bearer {key}"}
            )
            assert response.status_code == 200, response.text
        assert client.get("/health/ready").status_code == 200  # probes need no key
        assert client.get("/metrics").status_code == 401


def _long_generation(url: str, max_tokens: int) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/completions", timeout=120, json={"prompt": "The railway", "max_tokens": max_tokens, "temperature": 0}
    )


def test_overload_gets_429_and_readiness_holds(llama_variant, tmp_path):
    with run_server(llama_variant, "--max-concurrency", "1", "--queue", "1", tmp=tmp_path) as server:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(_long_generation, server.url, 480) for _ in range(6)]
            time.sleep(0.3)
            ready_during = httpx.get(f"{server.url}/health/ready", timeout=5).status_code
            live_during = httpx.get(f"{server.url}/health/live", timeout=5)
            responses = [f.result() for f in futures]
        codes = sorted(r.status_code for r in responses)
        assert codes.count(200) >= 2 and codes.count(429) >= 1 and set(codes) <= {200, 429}, codes
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.headers["retry-after"] == "1"
        assert_error(refused, 429, code="rate_limit_exceeded")
        assert ready_during == 200 and live_during.status_code == 200
        assert live_during.elapsed.total_seconds() < 1.0  # the event loop stayed free while a worker decoded
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'lmpack_requests_total{code="429",route="/v1/completions"}' in metrics


class SlowSteps:
    """The real decoder, 10 ms slower per step: long enough generations to disconnect from on any machine."""

    def __init__(self, runner, delay: float = 0.01):
        self.runner, self.delay, self.steps = runner, delay, 0

    def step(self, ids, cache):
        time.sleep(self.delay)
        self.steps += 1
        return self.runner.step(ids, cache)

    def step_batch(self, tokens, batch):
        time.sleep(self.delay)
        self.steps += 1
        return self.runner.step_batch(tokens, batch)

    def __getattr__(self, name):
        return getattr(self.runner, name)


def test_a_client_that_disconnects_stops_its_generation(llama_variant):
    engine = DecoderEngine(load_variant(llama_variant), threads=1)
    full = engine.generate(engine.encode_prompt("The railway"), SamplingParams(max_tokens=400, temperature=0)).result()
    assert full.completion_tokens == 400, "the test needs a prompt the model does not end early"
    slow = engine.runner = SlowSteps(engine.runner)
    body = {"prompt": "The railway", "max_tokens": 400, "temperature": 0}

    def steps_when_idle(url: str) -> int:
        deadline = time.monotonic() + 10
        while "lmpack_active_generations 1.0" in httpx.get(f"{url}/metrics").text and time.monotonic() < deadline:
            time.sleep(0.05)
        return slow.steps

    with serve_in_thread(create_app(engine, ServeSettings(max_concurrency=1, queue=0))) as url:
        before = slow.steps
        with httpx.stream("POST", f"{url}/v1/completions", timeout=60, json={**body, "stream": True}) as r:
            assert next(line for line in r.iter_lines() if line.startswith("data:"))
        assert steps_when_idle(url) - before < 100  # 400 without the cancel
        before = slow.steps
        with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
            httpx.post(f"{url}/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.3))
        assert steps_when_idle(url) - before < 100
        # the slot is free again: the next request is admitted rather than refused
        assert httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 2}).status_code == 200
