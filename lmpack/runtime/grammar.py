"""Structured outputs: OpenAI's `response_format` enforced token by token with llguidance.

A request's JSON schema becomes an llguidance grammar when the request is read (`grammar_for`, so a bad
schema is a 400 naming the field before any work); each generation then gets a `Constraint` that masks
the logits of every step to the tokens the grammar allows and advances with each chosen token. The mask is
per sequence, so rows of one batched step each follow their own grammar (or none).

Why llguidance: it needs nothing but its own 3 MB wheel (xgrammar requires torch, transformers and triton,
which a light server does not carry), compiles a schema in about a millisecond and computes a mask in
microseconds, where outlines-core built its index over the vocabulary for seconds for `json_object`
(docs/serving.md, "Structured outputs", has the measurements).
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import numpy as np

from lmpack.errors import RequestError

log = logging.getLogger("lmpack.grammar")

RESPONSE_FORMAT = "response_format"
# JSON written without free whitespace, with the separators Python's json.dumps writes: free whitespace let a
# small model pad its answer with newlines until its token budget ran out (docs/serving.md, "Structured outputs").
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:  # the runtime extra installs it; a hand-made environment may lack it
        raise RequestError(
            "response_format with a JSON schema needs the llguidance package, which this server does not have",
            param=RESPONSE_FORMAT,
            code="unsupported_value",
        ) from None
    return llguidance


def grammar_for(response_format: object) -> str | None:
    """The llguidance grammar of an OpenAI `response_format`, None for plain text; RequestError naming the field
    for anything else (an unknown type, a schema that is not a JSON object or that llguidance cannot compile)."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise RequestError("response_format must be an object", param=RESPONSE_FORMAT, code="invalid_type")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema: Any = {"type": "object"}
    elif kind == "json_schema":
        schema = _schema_of(response_format.get("json_schema"))
    else:
        raise RequestError(
            f'response_format type must be "text", "json_object" or "json_schema", got {kind!r}',
            param=f"{RESPONSE_FORMAT}.type",
        )
    try:
        grammar = _llguidance().LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except (ValueError, TypeError) as exc:
        raise RequestError(f"the JSON schema cannot be used: {exc}", param=_SCHEMA) from None
    return _validated(grammar, _SCHEMA)


def check_lark(lark: str, param: str) -> str:
    """An llguidance grammar from Lark (tools.py's call syntaxes); RequestError naming `param` when it cannot be
    enforced (a JSON schema inside it that llguidance refuses)."""
    try:
        grammar = _llguidance().LLMatcher.grammar_from_lark(lark)
    except (ValueError, TypeError) as exc:
        raise RequestError(f"the JSON schema cannot be used: {exc}", param=param) from None
    return _validated(grammar, param)


def _validated(grammar: str, param: str) -> str:
    is_error, messages = _llguidance().LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise RequestError(f"the JSON schema cannot be enforced: {_first_line(messages)}", param=param)
    return grammar


_SCHEMA = f"{RESPONSE_FORMAT}.json_schema.schema"


def _schema_of(spec: object) -> Any:
    """json_schema's `schema` (OpenAI's shape: name, description, schema, strict); a missing one is any object."""
    if not isinstance(spec, dict):
        raise RequestError(
            "response_format.json_schema must be an object with a name and a schema",
            param=f"{RESPONSE_FORMAT}.json_schema",
            code="invalid_type",
        )
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise RequestError("response_format.json_schema.name is required", param=f"{RESPONSE_FORMAT}.json_schema.name")
    schema = spec.get("schema", {"type": "object"})
    if not isinstance(schema, dict):
        raise RequestError("the JSON schema must be an object", param=_SCHEMA, code="invalid_type")
    return schema


def _first_line(messages: list[str]) -> str:
    return (messages[0] if messages else "unknown error").strip().splitlines()[0][:300]


class Grammars:
    """One model's side of constrained decoding: its vocabulary as llguidance reads it, made at the first
    constrained request (it takes a fraction of a second and some memory a plain server never needs)."""

    def __init__(self, tokenizer: Any, eos_token_id: int | None):
        self._tokenizer = tokenizer
        # llguidance before 1.7 (the last with wheels for glibc 2.28, what targets' bundles carry) takes one EOS:
        # the grammar lets it through once the document may end, and masks the model's other EOS ids
        self._eos = eos_token_id
        self._vocabulary: Any = None
        self._lock = threading.Lock()

    def _llg_tokenizer(self) -> Any:
        with self._lock:
            if self._vocabulary is None:
                llguidance = _llguidance()
                try:
                    self._vocabulary = llguidance.LLTokenizer(
                        _tokenizer_json(self._tokenizer),
                        n_vocab=self._tokenizer.get_vocab_size(with_added_tokens=True),
                        eos_token=self._eos,
                    )
                except Exception as exc:  # llguidance reads byte-level BPE and SentencePiece vocabularies
                    raise RequestError(
                        f"this model's tokenizer cannot be used for structured outputs: {exc}",
                        param=RESPONSE_FORMAT,
                        code="unsupported_value",
                    ) from None
            return self._vocabulary

    def constraint(self, grammar: str) -> Constraint:
        return Constraint(self._llg_tokenizer(), grammar)


def _tokenizer_json(tokenizer: Any) -> str:
    """The tokenizer as llguidance should read it. llguidance takes a decoder `Sequence` for SentencePiece's
    (byte fallback, "▁" for spaces), but transformers' conversion of a GGUF's byte-level BPE vocabulary writes
    such a Sequence ending in ByteLevel: read literally, every token with a leading space ("Ġ") is refused."""
    document = json.loads(tokenizer.to_str())
    document["padding"] = document["truncation"] = None
    decoder = document.get("decoder") or {}
    if decoder.get("type") == "Sequence":
        byte_level = [d for d in decoder.get("decoders", []) if d.get("type") == "ByteLevel"]
        if byte_level:
            document["decoder"] = byte_level[0]
    return json.dumps(document)


class Constraint:
    """One sequence's grammar state: `mask` the next step's logits, `accept` the token chosen from them."""

    def __init__(self, vocabulary: Any, grammar: str):
        llguidance = _llguidance()
        self._matcher = llguidance.LLMatcher(vocabulary, grammar, log_level=0)
        if self._matcher.is_error():
            raise RequestError(
                f"the JSON schema cannot be enforced: {_first_line([self._matcher.get_error()])}", param=_SCHEMA
            )
        self._vocab_size = vocabulary.vocab_size
        self._bits = np.zeros((self._vocab_size + 31) // 32, dtype=np.int32)

    @property
    def finished(self) -> bool:
        """The grammar is complete and allows nothing more (the sequence should end now), or it failed."""
        return self._matcher.is_stopped() or self._matcher.is_error()

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """A copy of `logits` with every token the grammar does not allow at -inf."""
        self._matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        allowed = np.unpackbits(self._bits.view(np.uint8), bitorder="little", count=self._vocab_size).astype(bool)
        masked = np.full(logits.shape, -np.inf, dtype=logits.dtype)
        width = min(logits.shape[-1], self._vocab_size)
        np.copyto(masked[:width], logits[:width], where=allowed[:width])
        return masked

    def accept(self, token: int) -> None:
        if not self._matcher.consume_token(token):  # only a token the mask refused can do this
            log.warning("the grammar refused token %d: %s", token, self._matcher.get_error())
