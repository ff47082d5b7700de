"""Choosing the next token: penalties, then greedy or temperature / top-k / top-p sampling, all on numpy.

The bounds live here, beside the code they protect, so the HTTP layer and `lmpack generate` refuse the
same values with the same messages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lmpack.errors import RequestError

MAX_STOP_SEQUENCES = 4
MAX_STOP_LENGTH = 256
MAX_TOP_K = 1000
# OpenAI's token budget for a /v1/completions request that sets none (resolve_max_tokens); the limit and the
# chat default are serve settings (config/serve.py: max_tokens_limit, default_max_tokens).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of the decoder. temperature 0 means greedy (OpenAI's convention)."""

    max_tokens: int = COMPLETIONS_DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    repetition_penalty: float = 1.0  # Hugging Face's: divides positive logits of tokens already seen
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from tokens already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence in the completion
    stop: tuple[str, ...] = ()
    grammar: str | None = None  # llguidance's grammar of the request's response_format (grammar.py); None: free text
    logit_bias: tuple[tuple[int, float], ...] = ()  # OpenAI's: (token id, -100..100) added to that token's logit
    logprobs: int | None = None  # the chosen tokens' logprobs with this many likeliest beside them; None: none

    def check(self, *, max_tokens_limit: int) -> SamplingParams:
        """Raise RequestError naming the first field out of bounds; return self so calls chain."""
        check_max_tokens("max_tokens", self.max_tokens, max_tokens_limit)
        check_choices(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            stop=self.stop,
        )
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def check_max_tokens(name: str, value: object, limit: int) -> None:
    """`name` is the field the client used (max_tokens or max_completion_tokens)."""
    check_bounds(name, value, 1, limit, integer=True)


def check_choices(
    *,
    temperature: object,
    top_p: object,
    top_k: object,
    seed: object,
    repetition_penalty: object,
    presence_penalty: object,
    frequency_penalty: object,
    stop: tuple[str, ...],
) -> None:
    """Every sampling field but the token budget, checked: RequestError naming the first out of bounds."""
    check_bounds("temperature", temperature, 0.0, 2.0)
    check_bounds("top_p", top_p, 0.0, 1.0)
    if top_p == 0:
        raise RequestError("top_p must be greater than 0", param="top_p")
    check_bounds("top_k", top_k, 0, MAX_TOP_K, integer=True)
    check_bounds("repetition_penalty", repetition_penalty, 0.0, 2.0)
    if repetition_penalty == 0:
        raise RequestError("repetition_penalty must be greater than 0", param="repetition_penalty")
    check_bounds("presence_penalty", presence_penalty, -2.0, 2.0)
    check_bounds("frequency_penalty", frequency_penalty, -2.0, 2.0)
    if seed is not None:
        check_bounds("seed", seed, -(2**63), 2**63 - 1, integer=True)
    if len(stop) > MAX_STOP_SEQUENCES:
        raise RequestError(f"stop may hold at most {MAX_STOP_SEQUENCES} sequences, got {len(stop)}", param="stop")
    for item in stop:
        if not isinstance(item, str) or not item or len(item) > MAX_STOP_LENGTH:
            raise RequestError(
                f"each stop sequence must be a non-empty string of at most {MAX_STOP_LENGTH} characters", param="stop"
            )


def resolve_max_tokens(
    requested: int | None, *, default: int, limit: int, context_length: int, prompt_tokens: int
) -> int:
    """A completion's token budget, the one place it is decided (as vLLM's get_max_tokens): what the request
    asked for (already checked against `limit`; one that overflows the context is refused by the engine, naming
    the field), else `default`, within `limit` and what the context has room for after the prompt, and at least 1
    (a prompt that fills the context is refused by the engine, naming the prompt)."""
    if requested is not None:
        return requested
    return max(1, min(default, limit, context_length - prompt_tokens))


def check_bounds(name: str, value, low, high, *, integer: bool = False) -> None:
    """RequestError naming `name` unless `value` is a number (an integer if asked) within [low, high]."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise RequestError(f"{name} must be {kind}, got {value!r}", param=name)
    if not math.isfinite(value) or not low <= value <= high:
        raise RequestError(f"{name} must be between {low} and {high}, got {value!r}", param=name)


class Sampler:
    """Picks tokens for one sequence; holds the request's random generator so a seed reproduces a completion."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int]):
        self.params = params
        # numpy wants a non-negative seed; OpenAI's may be any 64-bit integer
        self.rng = np.random.default_rng(None if params.seed is None else params.seed % 2**64)
        self.seen = set(prompt_ids)  # for the repetition penalty: prompt and completion
        self.counts: dict[int, int] = {}  # for presence and frequency penalties: completion only

    def __call__(self, logits: np.ndarray) -> int:
        logits = self._penalised(logits)
        p = self.params
        if p.greedy:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / p.temperature
        if p.top_k:
            candidates = _most_likely(scaled, p.top_k)
            scaled = scaled[candidates]
        else:
            candidates = None
        weights = np.exp(scaled - scaled.max())
        if p.top_p < 1.0:
            candidates, weights = _nucleus(weights, candidates, p.top_p)
        # inverse transform sampling, as Generator.choice(p=...) does, without its O(vocab) checks and copies
        cdf = np.cumsum(weights)
        index = min(int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right")), len(cdf) - 1)
        return int(index if candidates is None else candidates[index])

    def _penalised(self, logits: np.ndarray) -> np.ndarray:
        p = self.params
        repetition = p.repetition_penalty != 1.0 and self.seen
        occurrence = (p.presence_penalty or p.frequency_penalty) and self.counts
        if not (repetition or occurrence or p.logit_bias):
            return logits
        logits = logits.copy()
        for token, bias in p.logit_bias:
            logits[token] += bias
        if repetition:
            ids = np.fromiter(self.seen, dtype=np.int64)
            ids = ids[ids < logits.shape[0]]
            values = logits[ids]
            logits[ids] = np.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if occurrence:
            ids = np.fromiter(self.counts, dtype=np.int64)
            counts = np.fromiter(self.counts.values(), dtype=np.float32)
            logits[ids] -= p.presence_penalty + p.frequency_penalty * counts
        return logits

    def accept(self, token: int) -> None:
        self.seen.add(token)
        self.counts[token] = self.counts.get(token, 0) + 1


# top_p first looks among this many most likely tokens, and sorts the whole vocabulary only when they
# hold less than top_p of the probability (a flat distribution): sorting the whole vocabulary every token is
# several times slower (docs/serving.md, "Generation").
_NUCLEUS_GUESS = 1024


def _most_likely(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values (all of them when k covers the array), in no particular order."""
    if k >= values.shape[0]:
        return np.arange(values.shape[0])
    return np.argpartition(values, -k)[-k:]


def _nucleus(weights: np.ndarray, candidates: np.ndarray | None, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The smallest set of most likely tokens whose probability reaches top_p, most likely first:
    (token ids or positions in `candidates`, their unnormalised weights)."""
    total = weights.sum()
    ids = candidates if candidates is not None else np.arange(weights.shape[0])
    for guess in (_NUCLEUS_GUESS, weights.shape[0]):
        top = _most_likely(weights, guess)
        order = top[np.argsort(weights[top])[::-1]]
        cumulative = np.cumsum(weights[order])
        if cumulative[-1] >= top_p * total or guess >= weights.shape[0]:
            break
    keep = min(int(np.searchsorted(cumulative, top_p * total)) + 1, order.shape[0])
    return ids[order[:keep]], weights[order[:keep]]
