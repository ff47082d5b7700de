"""The OpenAPI 3.1 document of `lmpack serve` (/openapi.json): every endpoint and every request field it accepts.

Written out here rather than derived from the parsing code, which checks fields one by one to name the bad one in
its 400; tests/runtime/test_openapi.py runs schemathesis against a live server from this document (requests
valid and invalid by it, none may get a 5xx) and checks each documented field reaches the parser.
"""

from __future__ import annotations

from typing import Any

from lmpack.runtime.logprobs import MAX_TOP_LOGPROBS
from lmpack.runtime.protocol import MAX_EMBEDDING_INPUTS, MAX_LOGIT_BIAS
from lmpack.runtime.sampling import MAX_STOP_LENGTH, MAX_STOP_SEQUENCES, MAX_TOP_K


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


_NUMBER = {"type": "number"}
_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
_STOP = {
    "oneOf": [
        {"type": "string", "minLength": 1, "maxLength": MAX_STOP_LENGTH},
        {
            "type": "array",
            "items": {"type": "string", "minLength": 1, "maxLength": MAX_STOP_LENGTH},
            "maxItems": MAX_STOP_SEQUENCES,
        },
    ]
}
_SAMPLING: dict[str, Any] = {
    "model": {"type": "string", "description": "one of the served names (GET /v1/models)"},
    "max_tokens": {"type": "integer", "minimum": 1},
    "temperature": {**_NUMBER, "minimum": 0, "maximum": 2},
    "top_p": {**_NUMBER, "exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"type": "integer", "minimum": -1, "maximum": MAX_TOP_K},
    "seed": {"type": "integer"},
    "stop": _STOP,
    "presence_penalty": {**_NUMBER, "minimum": -2, "maximum": 2},
    "frequency_penalty": {**_NUMBER, "minimum": -2, "maximum": 2},
    "repetition_penalty": {**_NUMBER, "exclusiveMinimum": 0, "maximum": 2},
    "n": {"type": "integer", "minimum": 1, "description": "at most max_batch"},
    "best_of": {"type": "integer", "const": 1},
    "stream": {"type": "boolean"},
    "stream_options": {
        "type": "object",
        "properties": {"include_usage": {"type": "boolean"}},
        "additionalProperties": False,
    },
    "logit_bias": {
        "type": "object",
        "maxProperties": MAX_LOGIT_BIAS,
        "propertyNames": {"pattern": "^[0-9]+$"},
        "additionalProperties": {**_NUMBER, "minimum": -100, "maximum": 100},
    },
    "response_format": _ref("ResponseFormat"),
    "user": {"type": "string"},
}
_MESSAGE = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {
            "oneOf": [
                {"type": "string"},
                {"type": "null"},
                {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["type", "text"],
                        "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
                    },
                },
            ]
        },
        "name": {"type": "string"},
        "tool_call_id": {"type": "string"},
        "tool_calls": {"type": "array", "items": _ref("ToolCall")},
    },
}
_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_SCHEMAS: dict[str, Any] = {
    "Error": _ERROR,
    "ResponseFormat": {
        "oneOf": [
            {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["text", "json_object"]}}},
            {
                "type": "object",
                "required": ["type", "json_schema"],
                "properties": {
                    "type": {"const": "json_schema"},
                    "json_schema": {
                        "type": "object",
                        "required": ["name"],
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "description": {"type": "string"},
                            "schema": {"type": "object"},
                            "strict": {"type": ["boolean", "null"]},
                        },
                    },
                },
            },
        ]
    },
    "Tool": {
        "type": "object",
        "required": ["type", "function"],
        "properties": {
            "type": {"const": "function"},
            "function": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                    "description": {"type": "string"},
                    "parameters": {"type": "object"},
                    "strict": {"type": ["boolean", "null"]},
                },
            },
        },
    },
    "ToolCall": {
        "type": "object",
        "required": ["function"],
        "properties": {
            "id": {"type": "string"},
            "type": {"const": "function"},
            "function": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string"}, "arguments": {"type": ["string", "object"]}},
            },
        },
    },
    "CompletionRequest": {
        "type": "object",
        "required": ["prompt"],
        "properties": {
            **_SAMPLING,
            "prompt": {
                "oneOf": [
                    {"type": "string"},
                    {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1},
                    _TOKEN_IDS,
                    {"type": "array", "items": _TOKEN_IDS, "minItems": 1, "maxItems": 1},
                ]
            },
            "echo": {"type": "boolean"},
            "logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS},
            "parse_special_tokens": {"type": "boolean"},
        },
    },
    "ChatCompletionRequest": {
        "type": "object",
        "required": ["messages"],
        "properties": {
            **_SAMPLING,
            "messages": {"type": "array", "items": _MESSAGE, "minItems": 1},
            "max_completion_tokens": {"type": "integer", "minimum": 1},
            "logprobs": {"type": "boolean"},
            "top_logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS},
            "tools": {"type": "array", "items": _ref("Tool")},
            "tool_choice": {
                "oneOf": [
                    {"enum": ["auto", "none", "required"]},
                    {
                        "type": "object",
                        "required": ["type", "function"],
                        "properties": {
                            "type": {"const": "function"},
                            "function": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {"name": {"type": "string"}},
                            },
                        },
                    },
                ]
            },
            "parallel_tool_calls": {"type": "boolean"},
        },
    },
    "EmbeddingRequest": {
        "type": "object",
        "required": ["input"],
        "properties": {
            "model": {"type": "string"},
            "input": {
                "oneOf": [
                    {"type": "string"},
                    {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": MAX_EMBEDDING_INPUTS},
                ]
            },
            "encoding_format": {"enum": ["float", "base64"]},
        },
    },
    "TokenizeRequest": {
        "type": "object",
        "description": "exactly one of prompt, messages (vLLM's shape) and content (llama.cpp's)",
        "properties": {
            "model": {"type": "string"},
            "prompt": {"type": "string"},
            "messages": {"type": "array", "items": _MESSAGE, "minItems": 1},
            "content": {"type": "string"},
            "add_special_tokens": {"type": "boolean"},
            "add_special": {"type": "boolean"},
            "add_generation_prompt": {"type": "boolean"},
            "parse_special_tokens": {"type": "boolean"},
            "with_pieces": {"type": "boolean"},
            "return_token_strs": {"type": "boolean"},
        },
    },
    "DetokenizeRequest": {
        "type": "object",
        "required": ["tokens"],
        "properties": {"model": {"type": "string"}, "tokens": {"type": "array", "items": {"type": "integer"}}},
    },
}
# What a request can be refused with, besides its own 400 (docs/serving.md, "Limits and errors").
_REFUSALS = {
    "400": "a field out of its bounds, named in error.param",
    "401": "no valid API key, when the server has keys",
    "404": "a model that is not served here",
    "413": "a body over max_body_bytes",
    "415": "a body that is not uncompressed JSON",
    "429": "the queue is full; Retry-After says when to retry",
    "503": "starting, draining or failed; Retry-After says when to retry",
}


def _operation(summary: str, request: str | None = None, *, media: str = "application/json") -> dict[str, Any]:
    responses: dict[str, Any] = {"200": {"description": "the answer", "content": {media: {"schema": {}}}}}
    if request is not None:
        responses.update(
            {
                code: {"description": why, "content": {"application/json": {"schema": _ref("Error")}}}
                for code, why in _REFUSALS.items()
            }
        )
    operation: dict[str, Any] = {"summary": summary, "responses": responses}
    if request is not None:
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(request)}}}
    return operation


def document(version: str) -> dict[str, Any]:
    """The OpenAPI document for a server of lmpack `version`."""

    def health() -> dict[str, Any]:
        return {"get": _operation("200 while the process answers")}

    def ready() -> dict[str, Any]:
        return {"get": _operation("200 once warmed up; 503 while starting, draining or failed")}

    return {
        "openapi": "3.1.0",
        "info": {"title": "lmpack serve", "version": version, "description": "OpenAI-compatible API (docs/serving.md)"},
        "paths": {
            "/v1/models": {"get": _operation("the served model under each of its names")},
            "/v1/models/{model}": {
                "get": {
                    **_operation("one served name's model card"),
                    "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
                }
            },
            "/v1/completions": {"post": _operation("complete a prompt", "CompletionRequest")},
            "/v1/chat/completions": {"post": _operation("answer a conversation", "ChatCompletionRequest")},
            "/v1/embeddings": {"post": _operation("embed texts", "EmbeddingRequest")},
            "/tokenize": {"post": _operation("a text's tokens", "TokenizeRequest")},
            "/detokenize": {"post": _operation("the text of tokens", "DetokenizeRequest")},
            "/health/live": health(),
            "/health/ready": ready(),
            "/v2/health/live": health(),
            "/v2/health/ready": ready(),
            "/metrics": {"get": _operation("Prometheus metrics", media="text/plain")},
            "/openapi.json": {"get": _operation("this document")},
        },
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{}, {"bearer": []}],
    }
