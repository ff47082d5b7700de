"""One request's generation, and the loops that run generations: alone (SoloLoop) or in shared batches (batcher.py).

A Generation is a plain iterator of text deltas, so the server can run it in a worker thread and stop it
between two tokens by setting its cancel event. Which loop runs it is chosen once, by whoever makes the
generations (the server picks the batcher or the solo loop when it starts; `lmpack generate` runs alone),
and handed to each Generation: nothing dispatches on a mutable attribute.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np

from lmpack.runtime.grammar import Constraint, Grammars
from lmpack.runtime.logprobs import TokenLogprob, token_logprob
from lmpack.runtime.prefix_cache import PrefixCache
from lmpack.runtime.sampling import Sampler, SamplingParams
from lmpack.runtime.sessions import KVCache
from lmpack.runtime.textstream import IncrementalDecoder, StopMatcher

if TYPE_CHECKING:
    from lmpack.runtime.sessions import DecoderRunner

T = TypeVar("T")


class TokenModel(Protocol):
    """What choosing tokens needs of a model (DecoderEngine has it)."""

    tokenizer: Any
    eos_token_ids: frozenset[int]
    context_length: int
    grammars: Grammars


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

    Kept apart from any model call so the solo loop and the batcher make exactly the same decisions from
    the same logits: the only thing batching changes is how the logits are computed.
    """

    def __init__(self, model: TokenModel, prompt_ids: list[int], params: SamplingParams):
        self.sampler = Sampler(params, prompt_ids)
        # a response_format's grammar: the tokens it does not allow are masked before the sampler sees them
        self.constraint: Constraint | None = model.grammars.constraint(params.grammar) if params.grammar else None
        self.decoder = IncrementalDecoder(model.tokenizer, prompt_ids)
        self.stops = StopMatcher(params.stop)
        self.eos_token_ids = model.eos_token_ids
        self.context_length = model.context_length
        self.max_tokens = params.max_tokens
        self.token: int | None = None  # the token to feed next, while not finished
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.logprobs_top = params.logprobs
        # when the first token was chosen, and the gaps between the next ones (the serving metrics)
        self.first_token_at: float | None = None
        self.token_gaps: list[float] = []
        self._last_token_at = 0.0
        self.logprobs: list[TokenLogprob] = []  # the chosen tokens', when the request asks (params.logprobs)

    def advance(self, logits: np.ndarray, cache_length: int) -> str:
        """Choose the next token from `logits` (the cache then holds `cache_length` positions); return new text.

        Sets `finish_reason` once the sequence is done (and then returns the held-back tail too);
        otherwise `token` is what the next model step must be fed.
        """
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        raw = logits
        if self.constraint is not None:
            logits = self.constraint.mask(logits)
        token = self.sampler(logits)
        if token in self.eos_token_ids:
            return self._finish("stop")
        self.sampler.accept(token)
        if self.completion_tokens:
            self.token_gaps.append(now - self._last_token_at)
        self._last_token_at = now
        self.completion_tokens += 1
        if self.logprobs_top is not None:
            self.logprobs.append(token_logprob(raw, token, self.logprobs_top))
        text = self.stops.push(self.decoder.push(token))
        if self.constraint is not None:
            self.constraint.accept(token)
        if self.stops.stopped or self.constraint is not None and self.constraint.finished:
            return text + self._finish("stop")
        if self.completion_tokens >= self.max_tokens or cache_length + 1 >= self.context_length:
            return text + self._finish("length")
        self.token = token
        return text

    @property
    def next_token(self) -> int:
        """`token`, for a sequence that is not finished: what the next model step is fed."""
        assert self.token is not None  # advance() sets it whenever it does not finish the sequence
        return self.token

    def _finish(self, reason: str) -> str:
        tail = self.stops.push(self.decoder.flush()) + self.stops.flush()
        self.finish_reason = "stop" if self.stops.stopped else reason
        self.token = None
        return tail


def side_by_side(jobs: list[Callable[[], T]]) -> list[T]:
    """Run `jobs` at once, each in a thread of its own (one alone runs on this thread), and return their results
    in order; the first failure is raised here once all have ended. n choices of one request decode this way, so
    the batcher (or the solo loop) gets them together."""
    if len(jobs) == 1:
        return [jobs[0]()]
    results: list[Any] = [None] * len(jobs)
    failures: list[BaseException] = []

    def run(index: int) -> None:
        try:
            results[index] = jobs[index]()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(i,), name=f"lmpack-choice-{i}") for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    return results


class GenerationLoop(Protocol):
    """Runs generations: `run` yields one generation's text deltas and sets its finish_reason and timings."""

    def run(self, generation: Generation) -> Iterator[str]: ...

    def stop(self) -> None: ...


class Generation:
    """One request's token loop; iterate for text deltas, then read finish_reason and the token counts."""

    def __init__(
        self,
        model: TokenModel,
        prompt_ids: list[int],
        params: SamplingParams,
        loop: GenerationLoop,
        cancel: threading.Event | None = None,
        prefix_cache: PrefixCache | None = None,
    ):
        self.prompt_ids = prompt_ids
        self.params = params
        self.loop = loop
        self.cancel = cancel or threading.Event()
        self.created = time.perf_counter()  # the time to its first token counts from here, waiting included
        self.decoding = Decoding(model, prompt_ids, params)
        self.context_length = model.context_length
        self.finish_reason: str | None = None
        self.prefill_seconds = 0.0
        self.decode_seconds = 0.0
        # the prompt's cache and last logits when another generation already ran it (n choices of one prompt)
        self.prefilled: tuple[KVCache, np.ndarray] | None = None
        self.prefix_cache = prefix_cache
        self.cached_tokens = 0  # prompt tokens whose KV rows came from the prefix cache

    def prefill(self, runner: DecoderRunner) -> tuple[KVCache, np.ndarray]:
        """The prompt run through the model: its cache, with room for this generation, and the next token's logits."""
        for step in self.prefill_steps(runner):
            if step is not None:
                return step
        raise AssertionError("prefill_steps ends with its result")

    def prefill_steps(self, runner: DecoderRunner, chunk: int = 0) -> Iterator[tuple[KVCache, np.ndarray] | None]:
        """The prompt run `chunk` tokens at a time (all at once with 0): None after each chunk but the last, then the
        cache and the next token's logits, so a batcher can run decode steps between the chunks. With a prefix
        cache, the longest cached prefix's rows are copied in and only the rest of the prompt runs."""
        if self.prefilled is not None:
            done, self.prefilled = self.prefilled, None
            yield done
            return
        cache = KVCache(room=self.positions)
        hit = self.prefix_cache.lookup(self.prompt_ids) if self.prefix_cache is not None else None
        if hit is not None:
            cache.length, cache.values, self.cached_tokens = hit.length, hit.values, hit.length
        rest = self.prompt_ids[cache.length :]
        size = chunk if chunk > 0 else len(rest)
        for start in range(0, len(rest) - size, size):  # every chunk but the last
            runner.step(rest[start : start + size], cache)
            yield None
        logits = runner.step(rest[(len(rest) - 1) // size * size :], cache)
        if self.prefix_cache is not None:
            self.prefix_cache.store(self.prompt_ids, cache, known=self.cached_tokens)
        yield cache, logits

    @property
    def positions(self) -> int:
        """The most positions its cache can reach: the prompt and max_tokens, within the context."""
        return min(len(self.prompt_ids) + self.params.max_tokens, self.context_length)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return self.decoding.completion_tokens

    def __iter__(self) -> Iterator[str]:
        return self.loop.run(self)

    def result(self, on_text: Callable[[str], None] | None = None) -> Completion:
        """Run to the end and return the whole text with the counts; `on_text` sees each delta as it comes."""
        parts = []
        for delta in self:
            parts.append(delta)
            if on_text is not None:
                on_text(delta)
        return Completion(
            text="".join(parts),
            finish_reason=self.finish_reason or "length",
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            prefill_seconds=self.prefill_seconds,
            decode_seconds=self.decode_seconds,
        )


class SoloLoop:
    """Each generation runs alone, on the thread that iterates it: one sequence per model step."""

    def __init__(self, runner: DecoderRunner):
        self.runner = runner

    def run(self, generation: Generation) -> Iterator[str]:
        decoding = generation.decoding
        if generation.cancel.is_set():  # cancelled while it waited for a worker
            generation.finish_reason = "cancelled"
            return
        started = time.perf_counter()
        cache, logits = generation.prefill(self.runner)
        generation.prefill_seconds = time.perf_counter() - started
        started = time.perf_counter()
        while True:
            if generation.cancel.is_set():
                generation.finish_reason = "cancelled"
                return
            text = decoding.advance(logits, cache.length)
            if text:
                yield text
            if decoding.finish_reason is not None:
                break
            logits = self.runner.step([decoding.next_token], cache)
            generation.decode_seconds = time.perf_counter() - started
        generation.finish_reason = decoding.finish_reason

    def stop(self) -> None:
        """Nothing runs in the background: each generation ends with its own iteration."""
