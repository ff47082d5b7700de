"""/openapi.json describes the API, and no request built from it (valid or not by it) gets a server error.

schemathesis generates requests from the document, property-based (hypothesis), against a real `lmpack serve`.
"""

from __future__ import annotations

import hypothesis
import pytest
import schemathesis
from schemathesis.generation import GenerationMode


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_no_request_is_a_server_error(llama_server, mode):
    """Requests valid by the document, then ones that break it, for every operation: each answer is under 500.
    (schemathesis' pytest plugin does not run under pytest 9, so its strategies are driven with hypothesis.)"""
    schema = schemathesis.openapi.from_url(f"{llama_server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    # schemathesis leaves out the document's own path
    assert {op.path for op in operations} == set(schema.raw_schema["paths"]) - {"/openapi.json"}
    seen: list[str] = []
    for operation in operations:

        @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
        @hypothesis.settings(
            max_examples=25,
            deadline=None,
            derandomize=True,  # the same requests every run: a failure reproduces
            suppress_health_check=list(hypothesis.HealthCheck),
            database=None,
        )
        def no_server_error(case):
            response = case.call(timeout=120)
            assert response.status_code < 500, f"{case.method} {case.path} {case.body!r}: {response.text[:300]}"
            seen.append(str(response.status_code))

        try:
            no_server_error()
        except hypothesis.errors.Unsatisfiable:  # an operation without inputs has no invalid request
            assert mode == GenerationMode.NEGATIVE and operation.method == "get"
    assert "200" in seen or mode == GenerationMode.NEGATIVE


def test_the_document_lists_every_route(llama_server):
    from lmpack.runtime.server import ROUTES

    with llama_server.client() as http:
        document = http.get("/openapi.json").json()
    assert document["openapi"].startswith("3.1")
    served = {route.path.replace("{model:path}", "{model}") for route in ROUTES}
    assert served == set(document["paths"])
    chat = document["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"messages", "tools", "tool_choice", "logprobs", "top_logprobs", "response_format", "n"} <= set(chat)
