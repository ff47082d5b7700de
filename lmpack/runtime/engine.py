"""The engines: a decoder that generates text token by token with a KV cache, an encoder that embeds text.

One engine per served variant, shared by all requests: the onnxruntime session and the tokenizer are
safe to call from several threads, and every per-request state (cache, sampler, decoders) lives in a
Generation. Generation is a plain iterator, so the server can run it in a worker thread and stop it
between two tokens by setting its cancel event.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from lmpack.bundle.variant_dir import EMBEDDING, TEXT_GENERATION
from lmpack.errors import RequestError
from lmpack.runtime.chat import ChatTemplate
from lmpack.runtime.heap import release_file_pages, release_freed_heap
from lmpack.runtime.sampling import SamplingParams, Sampler
from lmpack.runtime.sessions import DecoderRunner, EncoderRunner, KVCache
from lmpack.runtime.textstream import IncrementalDecoder, StopMatcher
from lmpack.runtime.variant import Variant

DEFAULT_MAX_TOKENS_LIMIT = 4096
_GENERATION_DEFAULTS = ("temperature", "top_p", "top_k", "repetition_penalty")


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    prefill_seconds: float
    decode_seconds: float

    @property
    def decode_tokens_per_second(self) -> float | None:
        """Tokens after the first per second of decoding (the first token comes out of the prefill)."""
        steps = self.completion_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else None


class Decoding:
    """One sequence's choices between two model steps: sample a token, check EOS, stop sequences and limits,
    turn it into text.

    Kept apart from any model call so the unbatched loop below and the batching scheduler
    (batcher.py) make exactly the same decisions from the same logits: the only thing batching
    changes is how the logits are computed.
    """

    def __init__(self, engine: "DecoderEngine", prompt_ids: list[int], params: SamplingParams):
        self.sampler = Sampler(params, prompt_ids)
        self.decoder = IncrementalDecoder(engine.tokenizer, prompt_ids)
        self.stops = StopMatcher(params.stop)
        self.eos_token_ids = engine.eos_token_ids
        self.context_length = engine.context_length
        self.max_tokens = params.max_tokens
        self.token: int | None = None           # the token to feed next, while not finished
        self.finish_reason: str | None = None
        self.completion_tokens = 0

    def advance(self, logits: np.ndarray, cache_length: int) -> str:
        """Choose the next token from `logits` (the cache then holds `cache_length` positions); return new text.

        Sets `finish_reason` once the sequence is done (and then returns the held-back tail too);
        otherwise `token` is what the next model step must be fed.
        """
        token = self.sampler(logits)
        if token in self.eos_token_ids:
            return self._finish("stop")
        self.sampler.accept(token)
        self.completion_tokens += 1
        text = self.stops.push(self.decoder.push(token))
        if self.stops.stopped:
            return text + self._finish("stop")
        if self.completion_tokens >= self.max_tokens or cache_length + 1 >= self.context_length:
            return text + self._finish("length")
        self.token = token
        return text

    def _finish(self, reason: str) -> str:
        tail = self.stops.push(self.decoder.flush()) + self.stops.flush()
        self.finish_reason = "stop" if self.stops.stopped else reason
        self.token = None
        return tail


class Generation:
    """One request's token loop; iterate for text deltas, then read finish_reason and the token counts.

    When the engine has a batcher (the server's), iterating hands the sequence to it and relays the
    text it produces; otherwise the loop runs here, alone, on the calling thread.
    """

    def __init__(self, engine: "DecoderEngine", prompt_ids: list[int], params: SamplingParams,
                 cancel: threading.Event | None = None):
        self.engine = engine
        self.prompt_ids = prompt_ids
        self.params = params
        self.cancel = cancel or threading.Event()
        self.decoding = Decoding(engine, prompt_ids, params)
        self.finish_reason: str | None = None
        self.prefill_seconds = 0.0
        self.decode_seconds = 0.0

    @property
    def positions(self) -> int:
        """The most positions its cache can reach: the prompt and max_tokens, within the context."""
        return min(len(self.prompt_ids) + self.params.max_tokens, self.engine.context_length)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return self.decoding.completion_tokens

    def __iter__(self) -> Iterator[str]:
        if self.engine.batcher is not None:
            yield from self.engine.batcher.run(self)
            return
        decoding, runner = self.decoding, self.engine.runner
        cache = KVCache(room=self.positions)
        if self.cancel.is_set():  # cancelled while it waited for a worker
            self.finish_reason = "cancelled"
            return
        started = time.perf_counter()
        logits = runner.step(self.prompt_ids, cache)
        self.prefill_seconds = time.perf_counter() - started
        started = time.perf_counter()
        while True:
            if self.cancel.is_set():
                self.finish_reason = "cancelled"
                return
            text = decoding.advance(logits, cache.length)
            if text:
                yield text
            if decoding.finish_reason is not None:
                break
            logits = runner.step([decoding.token], cache)
            self.decode_seconds = time.perf_counter() - started
        self.finish_reason = decoding.finish_reason

    def result(self, on_text: Callable[[str], None] | None = None) -> Completion:
        """Run to the end and return the whole text with the counts; `on_text` sees each delta as it comes."""
        parts = []
        for delta in self:
            parts.append(delta)
            if on_text is not None:
                on_text(delta)
        text = "".join(parts)
        return Completion(text=text, finish_reason=self.finish_reason or "length", prompt_tokens=self.prompt_tokens,
                          completion_tokens=self.completion_tokens, prefill_seconds=self.prefill_seconds,
                          decode_seconds=self.decode_seconds)


class DecoderEngine:
    """A text-generation variant ready to answer: session, tokenizer, chat template, EOS ids, limits."""

    def __init__(self, variant: Variant, *, threads: int | None = None,
                 max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT):
        if variant.task != TEXT_GENERATION:
            raise RequestError(f"{variant.name} is an embedding model (task {variant.task}); it cannot generate text")
        self.variant = variant
        self.batcher: Any = None   # a batcher.Batcher once a server starts one; None: each generation runs alone
        self.tokenizer, self.runner = _load(variant, lambda: DecoderRunner(
            variant.onnx_path, threads=threads, providers=variant.providers,
            kv_padding=variant.info.get("kv_padding", "left")))
        eos = set(variant.eos_token_ids)
        if not eos and variant.special_token("eos_token"):
            eos.add(self.tokenizer.token_to_id(variant.special_token("eos_token")))
        self.eos_token_ids = frozenset(i for i in eos if i is not None)
        self.context_length = variant.context_length or 2048
        self.max_tokens_limit = min(max_tokens_limit, self.context_length)
        self.chat_template = (ChatTemplate(variant.chat_template, bos_token=variant.special_token("bos_token"),
                                           eos_token=variant.special_token("eos_token"))
                              if variant.chat_template else None)

    def defaults(self) -> dict[str, Any]:
        """Sampling defaults from generation_config.json where the model sets them (as other servers do)."""
        return {k: self.variant.generation[k] for k in _GENERATION_DEFAULTS
                if isinstance(self.variant.generation.get(k), (int, float))}

    def encode_prompt(self, prompt: str) -> list[int]:
        """Tokens of a raw prompt, with the tokenizer's own special tokens (a BOS where the model wants one)."""
        return self.tokenizer.encode(prompt, add_special_tokens=True).ids

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """Tokens of a conversation: the template writes the special tokens itself, so none are added."""
        if self.chat_template is None:
            raise RequestError(f"{self.variant.name} has no chat template; use /v1/completions with a prompt",
                               param="messages", code="no_chat_template")
        return self.tokenizer.encode(self.chat_template.render(messages), add_special_tokens=False).ids

    def generate(self, prompt_ids: list[int], params: SamplingParams, *, cancel: threading.Event | None = None,
                 prompt_param: str = "prompt") -> Generation:
        """Check the request against the model's limits, then return its (not yet started) Generation."""
        params.check(max_tokens_limit=self.max_tokens_limit)
        if not prompt_ids:
            raise RequestError("the prompt is empty", param=prompt_param)
        if len(prompt_ids) + params.max_tokens > self.context_length:
            raise RequestError(f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                               f"the model's context of {self.context_length} tokens",
                               param=prompt_param if len(prompt_ids) >= self.context_length else "max_tokens",
                               code="context_length_exceeded")
        return Generation(self, prompt_ids, params, cancel)


@dataclass(frozen=True)
class Embeddings:
    vectors: np.ndarray      # [n, hidden], L2-normalised
    prompt_tokens: int


class EncoderEngine:
    """An embedding variant: batches of texts in, mean-pooled normalised vectors out."""

    batch_size = 16  # bounds the activation memory of one call, whatever the request holds

    def __init__(self, variant: Variant, *, threads: int | None = None):
        if variant.task != EMBEDDING:
            raise RequestError(f"{variant.name} is not an embedding model (task {variant.task})")
        self.variant = variant
        self.tokenizer, self.runner = _load(variant, lambda: EncoderRunner(variant.onnx_path, threads=threads,
                                                                           providers=variant.providers))
        self.max_input_tokens = _encoder_length(variant)
        self.tokenizer.enable_truncation(self.max_input_tokens)
        pad = variant.special_token("pad_token")
        pad_id = self.tokenizer.token_to_id(pad) if pad else None
        self.tokenizer.enable_padding(**({"pad_id": pad_id, "pad_token": pad} if pad_id is not None else {}))

    def embed(self, texts: list[str]) -> Embeddings:
        vectors, tokens = [], 0
        for start in range(0, len(texts), self.batch_size):
            encoded = self.tokenizer.encode_batch(texts[start:start + self.batch_size])
            ids = np.array([e.ids for e in encoded], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
            tokens += int(mask.sum())
            vectors.append(self.runner.embed(ids, mask))
        return Embeddings(vectors=np.concatenate(vectors), prompt_tokens=tokens)


def _encoder_length(variant: Variant) -> int:
    """The shortest of the position table, the tokenizer's model_max_length and sentence-transformers' max_seq_length."""

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
    them back took SmolLM2 int8's resident memory from 258 to 238 MB after loading, 270 to 253 after three
    generations (the peak, while onnxruntime packs the LM head, stays 265). The weights file's pages that
    the session keeps mapped after packing go back too (docs/serving.md, "Memory").
    """
    tokenizer = variant.tokenizer()
    release_freed_heap()
    runner = make_runner()
    release_freed_heap()
    release_file_pages(variant.onnx_path.parent)
    return tokenizer, runner


def load_engine(variant: Variant, *, threads: int | None = None, max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT):
    """The engine that fits the variant's task."""
    if variant.task == EMBEDDING:
        return EncoderEngine(variant, threads=threads)
    return DecoderEngine(variant, threads=threads, max_tokens_limit=max_tokens_limit)
