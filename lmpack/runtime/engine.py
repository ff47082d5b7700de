"""The inference engines: a decoder that generates text token by token with a KV cache, an encoder that embeds text.

One engine per served variant, shared by all requests: the onnxruntime session and the tokenizer are
safe to call from several threads, and every per-request state (cache, sampler, decoders) lives in a
Generation (generation.py), run by the loop its maker chose: alone, or in the server's batcher.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmpack.bundle.variant_dir import EMBEDDING, TEXT_GENERATION
from lmpack.config.serve import ServeSettings
from lmpack.errors import RequestError
from lmpack.runtime.chat import ChatTemplate, normalize_messages
from lmpack.runtime.generation import Generation, GenerationLoop, SoloLoop
from lmpack.runtime.grammar import Grammars
from lmpack.runtime.heap import release_file_pages, release_freed_heap
from lmpack.runtime.prefix_cache import PrefixCache
from lmpack.runtime.sampling import SamplingParams
from lmpack.runtime.sessions import DecoderRunner, EncoderRunner
from lmpack.runtime.tools import syntax_of
from lmpack.runtime.variant import Variant

_GENERATION_DEFAULTS = ("temperature", "top_p", "top_k", "repetition_penalty")
# A request's sampling fields it leaves out, when the model's generation config sets none of them: llama.cpp's
# server defaults, documented and suited to chat models (OpenAI's temperature 1 with no cut made a small model
# ramble, docs/serving.md "Generation"); when the config sets some, the rest are OpenAI's neutral values.
CHAT_SAMPLING_DEFAULTS = {"temperature": 0.8, "top_p": 0.95, "top_k": 40, "repetition_penalty": 1.0}
_NEUTRAL = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}
_MAX_TOKENS_LIMIT = ServeSettings().max_tokens_limit  # `lmpack generate` holds to serve's default limit too


class DecoderEngine:
    """A text-generation variant ready to answer: session, tokenizer, chat template, EOS ids, limits."""

    def __init__(self, variant: Variant, *, threads: int | None = None, max_tokens_limit: int = _MAX_TOKENS_LIMIT):
        if variant.task != TEXT_GENERATION:
            raise RequestError(f"{variant.name} is an embedding model (task {variant.task}); it cannot generate text")
        self.variant = variant
        self.tokenizer, self.runner = _load(
            variant,
            lambda: DecoderRunner(
                variant.onnx_path,
                threads=threads,
                providers=variant.providers,
                kv_padding=variant.info.get("kv_padding", "left"),
            ),
        )
        # the same vocabulary reading control tokens' text as text: for what requests write (encode_prompt,
        # encode_chat); a second instance, since the setting belongs to the tokenizer, which threads share
        self.text_tokenizer = variant.tokenizer()
        self.text_tokenizer.encode_special_tokens = True
        self.max_token_chars = max((len(token) for token in self.tokenizer.get_vocab()), default=1)
        self.control_tokens = tuple(
            t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special and t.content
        )
        eos = set(variant.eos_token_ids)
        if not eos and variant.special_token("eos_token"):
            eos.add(self.tokenizer.token_to_id(variant.special_token("eos_token")))
        self.eos_token_ids = frozenset(i for i in eos if i is not None)
        self.context_length = variant.context_length or 2048
        eos_token = variant.special_token("eos_token")
        primary_eos = self.tokenizer.token_to_id(eos_token) if eos_token else None
        self.grammars = Grammars(
            self.tokenizer, primary_eos if primary_eos in self.eos_token_ids else min(self.eos_token_ids, default=None)
        )
        self.max_tokens_limit = min(max_tokens_limit, self.context_length)
        self.chat_template = (
            ChatTemplate(
                variant.chat_template,
                bos_token=variant.special_token("bos_token"),
                eos_token=variant.special_token("eos_token"),
            )
            if variant.chat_template
            else None
        )
        # how this model writes a tool call, read from its template once (tools.py)
        self.tool_syntax = syntax_of(variant.chat_template) if variant.chat_template else "json"

    @property
    def solo(self) -> SoloLoop:
        """The loop of generations whose maker chose none: each alone, on the thread that iterates it."""
        return SoloLoop(self.runner)

    def defaults(self) -> dict[str, Any]:
        """What a request gets for each sampling field it leaves out: generation_config.json's values where the
        model sets them (as vLLM does), else CHAT_SAMPLING_DEFAULTS."""
        given = self._configured_defaults()
        return {**(_NEUTRAL if given else CHAT_SAMPLING_DEFAULTS), **given}

    @property
    def defaults_source(self) -> str:
        return "the model's generation_config.json" if self._configured_defaults() else "lmpack's chat defaults"

    def _configured_defaults(self) -> dict[str, Any]:
        generation = self.variant.generation
        return {
            k: generation[k]
            for k in _GENERATION_DEFAULTS
            if isinstance(generation.get(k), (int, float)) and not isinstance(generation.get(k), bool)
        }

    def encode_prompt(self, prompt: str, *, parse_special: bool = False, add_special: bool = True) -> list[int]:
        """Tokens of a raw prompt, with the tokenizer's own special tokens (a BOS where the model wants one) unless
        not `add_special` (/tokenize in llama.cpp's shape).

        Control tokens written in the text ("<|im_end|>") are read as the text they are, unless `parse_special`
        (a caller that builds its own prompt format and asks for it)."""
        self._check_length(prompt, "prompt")
        tokenizer = self.tokenizer if parse_special else self.text_tokenizer
        return tokenizer.encode(prompt, add_special_tokens=add_special).ids

    def _check_length(self, text: str, param: str) -> None:
        """Refuse a text that cannot fit the context before tokenizing it: no token covers more than
        `max_token_chars` characters, so a longer text has more tokens than the context holds (a 2 MB prompt
        took seconds to tokenize only to be refused)."""
        if len(text) > 2 * self.max_token_chars * self.context_length:
            raise RequestError(
                f"the {param} ({len(text)} characters) is longer than the model's context of {self.context_length}"
                " tokens can hold",
                param=param,
                code="context_length_exceeded",
            )

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Tokens of a conversation: the template writes the control tokens; the messages' text never does.

        A content that holds a control token's text is tokenized as plain text, piece by piece with the
        template's markup; any other conversation is tokenized whole, as before (the same tokens)."""
        template = self.chat_template
        if template is None:
            raise RequestError(
                f"{self.variant.name} has no chat template; use /v1/completions with a prompt",
                param="messages",
                code="no_chat_template",
            )
        contents = [m["content"] for m in normalize_messages(messages)]
        self._check_length("".join(contents), "messages")
        forged = [token for token in self.control_tokens if any(token in content for content in contents)]
        if tools and not template.supports_tools:
            raise RequestError(
                f"{self.variant.name}'s chat template cannot show tools to the model, so it cannot call them",
                param="tools",
                code="tools_not_supported",
            )
        if not forged:
            return self.tokenizer.encode(template.render(messages, tools=tools), add_special_tokens=False).ids
        segments = template.segments(messages, tools=tools)
        if segments is None:
            raise RequestError(
                f"the messages hold the model's control token {forged[0]!r}, which this model's chat template "
                "does not let lmpack keep apart from its own markup",
                param="messages",
            )
        ids: list[int] = []
        for text, from_content in segments:
            tokenizer = self.text_tokenizer if from_content else self.tokenizer
            ids += tokenizer.encode(text, add_special_tokens=False).ids
        return ids

    def check_token_ids(self, ids: list[int], param: str) -> list[int]:
        """Token ids a request gives (a prompt, logit_bias' keys): RequestError naming `param` unless each is in the
        vocabulary."""
        vocabulary = self.tokenizer.get_vocab_size(with_added_tokens=True)
        outside = [i for i in ids if not 0 <= i < vocabulary]
        if outside:
            raise RequestError(f"token id {outside[0]} is not in the vocabulary (0 to {vocabulary - 1})", param=param)
        return ids

    def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        cancel: threading.Event | None = None,
        prompt_param: str = "prompt",
        loop: GenerationLoop | None = None,
        prefix_cache: PrefixCache | None = None,
    ) -> Generation:
        """Check the request against the model's limits, then return its (not yet started) Generation, run by
        `loop` (the server's batcher) or else alone."""
        params.check(max_tokens_limit=self.max_tokens_limit)
        self.check_token_ids([token for token, _ in params.logit_bias], "logit_bias")
        if not prompt_ids:
            raise RequestError("the prompt is empty", param=prompt_param)
        if len(prompt_ids) + params.max_tokens > self.context_length:
            raise RequestError(
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                f"the model's context of {self.context_length} tokens",
                param=prompt_param if len(prompt_ids) >= self.context_length else "max_tokens",
                code="context_length_exceeded",
            )
        return Generation(self, prompt_ids, params, loop or self.solo, cancel, prefix_cache)


@dataclass(frozen=True)
class Embeddings:
    vectors: np.ndarray  # [n, hidden], L2-normalised
    prompt_tokens: int


class EncoderEngine:
    """An embedding variant: batches of texts in, vectors pooled (and normalised) as the model's own pipeline does."""

    batch_size = 16  # bounds the activation memory of one call, whatever the request holds

    def __init__(self, variant: Variant, *, threads: int | None = None):
        if variant.task != EMBEDDING:
            raise RequestError(f"{variant.name} is not an embedding model (task {variant.task})")
        self.variant = variant
        self.tokenizer, self.runner = _load(
            variant,
            lambda: EncoderRunner(
                variant.onnx_path,
                threads=threads,
                providers=variant.providers,
                pooling=variant.info.get("pooling", "mean"),
                normalize=variant.info.get("normalize", True),
            ),
        )
        self.max_input_tokens = _encoder_length(variant)
        self.tokenizer.enable_truncation(self.max_input_tokens)
        pad = variant.special_token("pad_token")
        pad_id = self.tokenizer.token_to_id(pad) if pad else None
        self.tokenizer.enable_padding(**({"pad_id": pad_id, "pad_token": pad} if pad_id is not None else {}))

    def embed(self, texts: list[str]) -> Embeddings:
        vectors, tokens = [], 0
        for start in range(0, len(texts), self.batch_size):
            encoded = self.tokenizer.encode_batch(texts[start : start + self.batch_size])
            ids = np.array([e.ids for e in encoded], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
            tokens += int(mask.sum())
            vectors.append(self.runner.embed(ids, mask))
        return Embeddings(vectors=np.concatenate(vectors), prompt_tokens=tokens)


def _encoder_length(variant: Variant) -> int:
    """The shortest of the position table, the tokenizer's model_max_length and sentence-transformers'
    max_seq_length."""

    limits = [variant.context_length or 512]
    model_max = variant.tokenizer_config.get("model_max_length")
    if isinstance(model_max, int) and 0 < model_max < 1_000_000:
        limits.append(model_max)
    st_config = variant.model_dir / "sentence_bert_config.json"
    if st_config.is_file():
        try:
            limits.append(int(json.loads(st_config.read_text())["max_seq_length"]))
        except (ValueError, KeyError, TypeError):
            pass
    return min(limits)


def _load(variant: Variant, make_runner: Callable[[], Any]) -> tuple[Any, Any]:
    """The variant's tokenizer, then its runner, each followed by handing freed heap back to the system.

    Parsing the tokenizer's JSON and building the session free tens of MB that glibc would keep: handing
    them back lowers the resident memory after loading and after generating (the peak, while onnxruntime
    packs the LM head, does not move). The weights file's pages that the session keeps mapped after packing
    go back too (docs/serving.md, "Memory", has the figures for both).
    """
    tokenizer = variant.tokenizer()
    release_freed_heap()
    runner = make_runner()
    release_freed_heap()
    release_file_pages(variant.onnx_path.parent)
    return tokenizer, runner


def load_engine(
    variant: Variant, *, threads: int | None = None, max_tokens_limit: int = _MAX_TOKENS_LIMIT
) -> DecoderEngine | EncoderEngine:
    """The engine that fits the variant's task."""
    if variant.task == EMBEDDING:
        return EncoderEngine(variant, threads=threads)
    return DecoderEngine(variant, threads=threads, max_tokens_limit=max_tokens_limit)
