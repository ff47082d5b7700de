"""/tokenize and /detokenize: a text's tokens and the text of tokens, in vLLM's and llama.cpp's shapes.

A client counts a prompt's tokens before sending it (to fit the context, to bill, to truncate a history) with
exactly the tokens a completion would be given: a `prompt` is tokenized as /v1/completions tokenizes it (the
tokenizer's special tokens such as a BOS, control-token text read as text unless `parse_special_tokens`),
`messages` through the chat template as /v1/chat/completions does. llama.cpp's server takes `content`
(no special tokens unless `add_special`) and answers with `tokens` alone; vLLM's takes `prompt` or `messages`
and answers with `count`, `max_model_len` and `tokens`. Both are accepted here, each answered in its own shape.
"""

from __future__ import annotations

from typing import Any

from lmpack.runtime.chat import normalize_messages
from lmpack.runtime.engine import DecoderEngine
from lmpack.runtime.protocol import PARSE_SPECIAL, bad


def _flag(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"{name} must be true or false", name, "invalid_type")
    return value


def tokenize(engine: DecoderEngine, body: dict[str, Any]) -> dict[str, Any]:
    """The answer to a /tokenize body (the caller runs it off the event loop: a long text takes a while)."""
    given = [name for name in ("content", "prompt", "messages") if body.get(name) is not None]
    if len(given) != 1:
        raise bad(
            "give exactly one of content (llama.cpp's shape), prompt or messages (vLLM's)",
            given[1] if len(given) > 1 else "prompt",
            "invalid_value" if given else "missing_required_parameter",
        )
    field = given[0]
    if field == "messages":
        if not _flag(body, "add_generation_prompt", True):
            raise bad("only add_generation_prompt true is supported", "add_generation_prompt", "unsupported_value")
        ids = engine.encode_chat(normalize_messages(body["messages"]))
    else:
        text = body[field]
        if not isinstance(text, str):
            raise bad(f"{field} must be a string", field, "invalid_type")
        special = _flag(body, "add_special" if field == "content" else "add_special_tokens", field == "prompt")
        ids = engine.encode_prompt(text, parse_special=_flag(body, PARSE_SPECIAL, False), add_special=special)
    if field == "content":  # llama.cpp's answer
        if _flag(body, "with_pieces", False):
            return {
                "tokens": [{"id": i, "piece": engine.tokenizer.decode([i], skip_special_tokens=False)} for i in ids]
            }
        return {"tokens": ids}
    answer: dict[str, Any] = {"count": len(ids), "max_model_len": engine.context_length, "tokens": ids}
    if _flag(body, "return_token_strs", False):
        answer["token_strs"] = [engine.tokenizer.id_to_token(i) for i in ids]
    return answer


def detokenize(engine: DecoderEngine, body: dict[str, Any]) -> dict[str, Any]:
    """The text of `tokens`, special tokens written out; `prompt` for vLLM's clients, `content` for llama.cpp's."""
    tokens = body.get("tokens")
    vocabulary = engine.tokenizer.get_vocab_size(with_added_tokens=True)
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise bad("tokens must be an array of token ids", "tokens", "invalid_type")
    if any(not 0 <= t < vocabulary for t in tokens):
        raise bad(f"token ids must be between 0 and {vocabulary - 1}", "tokens")
    text = engine.tokenizer.decode(tokens, skip_special_tokens=False)
    return {"prompt": text, "content": text}
