"""The generation metrics under vLLM's names, as dashboards and the Gateway API inference extension read them."""

from __future__ import annotations

import re


def _value(text: str, name: str, labels: str) -> float:
    match = re.search(rf"^{re.escape(name)}{{{re.escape(labels)}}} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_a_generation_is_counted_under_vllms_names(llama_server):
    with llama_server.client() as http:
        name = http.get("/v1/models").json()["data"][0]["id"]
        model = f'model_name="{name}"'
        before = http.get("/metrics").text
        answer = http.post("/v1/completions", json={"prompt": "The railway", "max_tokens": 9, "temperature": 0}).json()
        after = http.get("/metrics").text
    tokens, reason = answer["usage"]["completion_tokens"], answer["choices"][0]["finish_reason"]

    def grew(metric: str, labels: str = model) -> float:
        return _value(after, metric, labels) - _value(before, metric, labels)

    assert grew("vllm:time_to_first_token_seconds_count") == 1
    assert grew("vllm:e2e_request_latency_seconds_count") == 1
    assert grew("vllm:inter_token_latency_seconds_count") == tokens - 1
    assert grew("vllm:prompt_tokens_total") == answer["usage"]["prompt_tokens"]
    assert grew("vllm:generation_tokens_total") == tokens
    assert grew("vllm:request_success_total", f'finished_reason="{reason}",{model}') == 1
    assert _value(after, "vllm:e2e_request_latency_seconds_sum", model) >= _value(
        after, "vllm:time_to_first_token_seconds_sum", model
    )
    for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert re.search(rf"^{re.escape(gauge)}{{{re.escape(model)}}} 0\.0$", after, re.MULTILINE), gauge
