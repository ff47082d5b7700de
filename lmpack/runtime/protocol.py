"""The OpenAI wire format: request bodies checked into typed requests, responses and stream chunks built.

Every check raises ApiError, or the RequestError the sampling bounds and the engine raise, naming the field
(`param`); the server turns either into a 400 in OpenAI's error shape, so a bad request never reaches the
engine as a 500. Fields that OpenAI clients send by default (`user`, `stream_options`) are accepted, a JSON
`response_format` is enforced (grammar.py); features this server does not have (n > 1, tools, ...) are refused
by name rather than silently ignored.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmpack.errors import RequestError
from lmpack.runtime.chat import normalize_messages
from lmpack.runtime.grammar import RESPONSE_FORMAT, grammar_for
from lmpack.runtime.logprobs import MAX_TOP_LOGPROBS
from lmpack.runtime.sampling import SamplingParams, check_choices, check_max_tokens
from lmpack.runtime.tools import ToolRequest, parse_tools

MAX_EMBEDDING_INPUTS = 256
# lmpack's opt-in on /v1/completions: control tokens written in the prompt ("<|im_end|>") act as such, for
# callers that build the model's prompt format themselves; by default they are read as the text they are.
PARSE_SPECIAL = "parse_special_tokens"


class ApiError(Exception):
    """An HTTP error with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def from_request_error(cls, exc: RequestError) -> ApiError:
        return cls(400, exc.message, param=exc.param, code=exc.code or "invalid_value")


def bad(message: str, param: str | None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True)
class GenerationRequest:
    """/v1/completions or /v1/chat/completions, checked. max_tokens None: the client asked for no budget, so
    sampling.resolve_max_tokens decides it once the prompt's length is known."""

    choices: dict[str, Any]  # SamplingParams' fields but max_tokens, each within bounds
    max_tokens: int | None
    stream: bool
    include_usage: bool
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    parse_special: bool = False  # a completion's control tokens written in the prompt act as such (opt-in)
    prompt_ids: list[int] | None = None  # a completion's prompt given as token ids instead of `prompt`
    echo: bool = False  # a completion's text (and logprobs) start with the prompt's
    tools: ToolRequest | None = None  # a chat request's tools and tool_choice
    n: int = 1  # choices, sharing one prefill (checked against the batch size by the route)

    def params(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, **self.choices)


@dataclass(frozen=True)
class EmbeddingRequest:
    inputs: list[str]
    encoding_format: str


def _field(body: dict, name: str, kinds: tuple[type, ...], default: Any = None, *, what: str) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise bad(f"{name} must be {what}, got {type(value).__name__}", name, "invalid_type")
    return value


def check_model(body: dict, names: tuple[str, ...]) -> None:
    """`model`, when given, must be one of the served names (the first is the model's own, the rest aliases)."""
    model = body.get("model")
    if model is not None and model not in names:
        raise ApiError(
            404,
            f"model {model!r} is not served here; this server serves {names[0]!r}"
            + (f" (also called {', '.join(repr(n) for n in names[1:])})" if names[1:] else ""),
            param="model",
            code="model_not_found",
        )


def _refuse_unsupported(body: dict) -> None:
    n = body.get("n", 1)
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):  # true == 1 in Python, not JSON
        raise bad("n must be a positive integer", "n", "invalid_value")
    best_of = body.get("best_of", 1)
    if best_of is not None and (isinstance(best_of, bool) or best_of != 1):
        raise bad("best_of is not supported", "best_of", "unsupported_value")
    for name in ("suffix", "functions", "function_call"):  # functions: OpenAI's deprecated spelling of tools
        value = body.get(name)
        if value not in (None, False, {}, [], "", "none"):
            raise bad(f"{name} is not supported by this server", name, "unsupported_parameter")


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise bad("stop must be a string or an array of strings", "stop", "invalid_type")


def _choices(body: dict, defaults: dict[str, Any]) -> dict[str, Any]:
    number, integer = (int, float), (int,)
    values = {
        "temperature": _field(body, "temperature", number, defaults["temperature"], what="a number"),
        "top_p": _field(body, "top_p", number, defaults["top_p"], what="a number"),
        "top_k": _field(body, "top_k", integer, defaults["top_k"], what="an integer"),
        "seed": _field(body, "seed", integer, None, what="an integer"),
        "repetition_penalty": _field(
            body, "repetition_penalty", number, defaults["repetition_penalty"], what="a number"
        ),
        "presence_penalty": _field(body, "presence_penalty", number, 0.0, what="a number"),
        "frequency_penalty": _field(body, "frequency_penalty", number, 0.0, what="a number"),
    }
    if values["top_k"] == -1:  # vLLM's spelling of "off"
        values["top_k"] = 0
    return {
        **values,
        "stop": _stop(body),
        "grammar": grammar_for(body.get(RESPONSE_FORMAT)),
        "logit_bias": _logit_bias(body),
    }


MAX_LOGIT_BIAS = 300  # OpenAI's bound on the tokens one request may bias


def _logit_bias(body: dict) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias from -100 to 100}; the ids are checked against the vocabulary by the engine."""
    bias = _field(body, "logit_bias", (dict,), {}, what="an object mapping token ids to numbers")
    if len(bias) > MAX_LOGIT_BIAS:
        raise bad(f"logit_bias may hold at most {MAX_LOGIT_BIAS} tokens, got {len(bias)}", "logit_bias")
    pairs = []
    for key, value in bias.items():
        if not (isinstance(key, str) and key.isdigit()):
            raise bad(f"logit_bias keys must be token ids, got {key!r}", "logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise bad(f"logit_bias values must be numbers from -100 to 100, got {value!r}", "logit_bias")
        pairs.append((int(key), float(value)))
    return tuple(sorted(pairs))


def _logprobs(body: dict, *, chat: bool) -> int | None:
    """How many likeliest tokens to list beside each chosen one's logprob; None: no logprobs. Chat asks with
    `logprobs: true` and `top_logprobs`, completions with `logprobs: N` (OpenAI's two shapes)."""
    if chat:
        wanted = _field(body, "logprobs", (bool,), False, what="true or false")
        top = _field(body, "top_logprobs", (int,), None, what="an integer")
        if top is not None and not wanted:
            raise bad("top_logprobs needs logprobs set to true", "top_logprobs")
        name = "top_logprobs"
    else:
        if body.get("top_logprobs") is not None:
            raise bad("completions take logprobs: N (the likeliest N tokens), not top_logprobs", "top_logprobs")
        top = _field(body, "logprobs", (int,), None, what="an integer")
        wanted, name = top is not None, "logprobs"
    if not wanted:
        return None
    top = top or 0
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise bad(f"{name} must be between 0 and {MAX_TOP_LOGPROBS}, got {top}", name)
    return top


def parse_generation(body: dict, *, chat: bool, defaults: dict[str, Any], max_tokens_limit: int) -> GenerationRequest:
    """Check a completions (chat=False) or chat completions body; the sampling bounds are checked here too."""
    _refuse_unsupported(body)
    n = body.get("n") or 1  # checked there: a positive integer, or absent
    names = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    max_tokens, max_name = None, "max_tokens"
    for name in names:
        if body.get(name) is not None:
            max_tokens, max_name = _field(body, name, (int,), what="an integer"), name
            break
    choices = _choices(body, defaults)
    if max_tokens is not None:
        check_max_tokens(max_name, max_tokens, max_tokens_limit)
    check_choices(**{name: value for name, value in choices.items() if name not in ("grammar", "logit_bias")})
    choices["logprobs"] = _logprobs(body, chat=chat)
    stream = _field(body, "stream", (bool,), False, what="true or false")
    options = _field(body, "stream_options", (dict,), {}, what="an object")
    unknown = sorted(set(options) - {"include_usage"})
    if unknown:  # as OpenAI: a misspelt option is an error, not ignored
        raise bad(f"stream_options has no option {unknown[0]!r}", f"stream_options.{unknown[0]}", "invalid_value")
    if "include_usage" in options and not isinstance(options["include_usage"], bool):
        raise bad("stream_options.include_usage must be true or false", "stream_options.include_usage", "invalid_type")
    include_usage = bool(options.get("include_usage")) if stream else False
    if chat and body.get("echo"):
        raise bad("echo is for /v1/completions", "echo", "unsupported_parameter")
    if stream and body.get("echo"):
        raise bad("echo is not supported with stream", "echo", "unsupported_value")
    if chat and body.get(PARSE_SPECIAL) is not None:
        raise bad(
            f"{PARSE_SPECIAL} is for /v1/completions: chat messages are always read as text",
            PARSE_SPECIAL,
            "unsupported_parameter",
        )
    if chat:
        if "messages" not in body:
            raise bad("messages is required", "messages", "missing_required_parameter")
        messages = normalize_messages(body["messages"])
        tools = parse_tools(body)
        if tools is not None and tools.choice in ("required", "function") and choices["grammar"] is not None:
            raise bad("a response_format cannot be enforced together with a required tool call", "tool_choice")
        return GenerationRequest(
            choices=choices,
            max_tokens=max_tokens,
            stream=stream,
            include_usage=include_usage,
            messages=messages,
            tools=tools,
            n=n,
        )
    for name in ("tools", "tool_choice"):
        if body.get(name) not in (None, [], "none"):
            raise bad(f"{name} is for /v1/chat/completions", name, "unsupported_parameter")
    prompt, prompt_ids = _prompt(body.get("prompt"))
    parse_special = _field(body, PARSE_SPECIAL, (bool,), False, what="true or false")
    return GenerationRequest(
        choices=choices,
        max_tokens=max_tokens,
        stream=stream,
        include_usage=include_usage,
        prompt=prompt,
        prompt_ids=prompt_ids,
        parse_special=parse_special,
        echo=_field(body, "echo", (bool,), False, what="true or false"),
        n=n,
    )


def _is_ids(value: object) -> bool:
    return (
        isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def _prompt(prompt: object) -> tuple[str | None, list[int] | None]:
    """A completion's prompt: text, or token ids (what evaluation harnesses send); an array of one of either."""
    if isinstance(prompt, list) and len(prompt) == 1 and (isinstance(prompt[0], str) or _is_ids(prompt[0])):
        prompt = prompt[0]
    if prompt is None:
        raise bad("prompt is required", "prompt", "missing_required_parameter")
    if isinstance(prompt, str):
        return prompt, None
    if _is_ids(prompt):
        assert isinstance(prompt, list)
        return None, prompt
    raise bad(
        "prompt must be a string or an array of token ids (or an array of one of them: one prompt per request)",
        "prompt",
        "invalid_type",
    )


def parse_embeddings(body: dict) -> EmbeddingRequest:
    if "input" not in body:
        raise bad("input is required", "input", "missing_required_parameter")
    inputs = body["input"]
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) for i in inputs):
        raise bad(
            "input must be a string or a non-empty array of strings (token arrays are not supported)",
            "input",
            "invalid_type",
        )
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        raise bad(f"input may hold at most {MAX_EMBEDDING_INPUTS} strings, got {len(inputs)}", "input")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise bad('encoding_format must be "float" or "base64"', "encoding_format")
    if body.get("dimensions") is not None:
        raise bad(
            "dimensions is not supported: the model's full embedding is returned", "dimensions", "unsupported_parameter"
        )
    return EmbeddingRequest(inputs=inputs, encoding_format=encoding)


# Responses -------------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def choice_body(
    *,
    index: int = 0,
    chat: bool,
    text: str | None,
    finish_reason: str,
    logprobs: dict | None = None,
    tool_calls: list[dict] | None = None,
) -> dict:
    if not chat:
        return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"index": index, "message": message, "finish_reason": finish_reason, "logprobs": logprobs}


def completion_body(*, id: str, model: str, chat: bool, choices: list[dict], usage: dict) -> dict:
    return {
        "id": id,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage,
    }


def chunk_body(
    *,
    id: str,
    model: str,
    chat: bool,
    text: str | None = None,
    index: int = 0,
    role: bool = False,
    finish_reason: str | None = None,
    usage: dict | None = None,
    logprobs: dict | None = None,
    tool_calls: list[dict] | None = None,
) -> dict:
    """One server-sent event's payload; usage-only chunks have no choices, as OpenAI's include_usage does."""
    body: dict[str, Any] = {
        "id": id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
    }
    if usage is not None:
        body.update(choices=[], usage=usage)
        return body
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text:
            delta["content"] = text
        if tool_calls:
            delta["tool_calls"] = tool_calls
        body["choices"] = [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}]
    else:
        body["choices"] = [{"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": logprobs}]
    return body


def embeddings_body(*, model: str, vectors: np.ndarray, encoding_format: str, prompt_tokens: int) -> dict:
    data = []
    for index, vector in enumerate(vectors):
        if encoding_format == "base64":  # what the openai client asks for by default: float32, little-endian
            embedding: Any = base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
        else:
            embedding = [float(x) for x in vector]
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
