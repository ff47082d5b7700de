"""Log probabilities of tokens: of those a generation chose, of a prompt's own tokens (`echo`), in OpenAI's shapes.

The values are the model's own distribution at each position, log-softmax of its logits before penalties,
`logit_bias`, a response_format's mask, temperature or top-k/top-p (vLLM's default, "raw logprobs"): what an
evaluation harness scores a continuation by, whatever the request's sampling fields.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from lmpack.runtime.sessions import DecoderRunner

MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs, and vLLM's default
# A prompt's logprobs are computed this many positions at a time: the logits of one chunk are what is held
# (positions x vocabulary floats: 512 x 128,256 x 4 bytes is 260 MB for a Llama 3 vocabulary).
_PROMPT_CHUNK = 256


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the likeliest tokens at that position, likeliest first


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def token_logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    """The logprob of `token` under one position's `logits`, with the `top` likeliest tokens."""
    values = log_softmax(logits)
    likeliest: tuple[tuple[int, float], ...] = ()
    if top:
        ids = np.argpartition(values, -top)[-top:]
        ids = ids[np.argsort(values[ids])[::-1]]
        likeliest = tuple((int(i), float(values[i])) for i in ids)
    return TokenLogprob(token, float(values[token]), likeliest)


def prompt_logprobs(runner: DecoderRunner, prompt_ids: Sequence[int], top: int) -> list[TokenLogprob | None]:
    """Each prompt token's logprob given the tokens before it; None for the first, which has no context."""
    from lmpack.runtime.sessions import KVCache

    cache = KVCache(room=len(prompt_ids))
    result: list[TokenLogprob | None] = [None]
    for start in range(0, len(prompt_ids), _PROMPT_CHUNK):
        chunk = list(prompt_ids[start : start + _PROMPT_CHUNK])
        logits = runner.step_window(chunk, cache)
        following = prompt_ids[start + 1 : start + 1 + len(chunk)]  # what each position predicts
        result += [token_logprob(logits[i], token, top) for i, token in enumerate(following)]
    return result


class Renderer:
    """Token logprobs written in OpenAI's shapes, with the tokens' text from the model's tokenizer."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def chat(self, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
        """Chat completions' `logprobs`: {"content": [{token, logprob, bytes, top_logprobs}, ...]}."""
        return {"content": [self._chat_entry(e.token, e.logprob, e.top) for e in entries], "refusal": None}

    def _chat_entry(self, token: int, logprob: float, top: tuple[tuple[int, float], ...] | None) -> dict[str, Any]:
        text = self.text(token)
        entry: dict[str, Any] = {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
        if top is not None:
            entry["top_logprobs"] = [self._chat_entry(i, value, None) for i, value in top]
        return entry

    def completion(self, entries: Sequence[TokenLogprob | None], tokens: Sequence[int]) -> dict[str, Any]:
        """Completions' `logprobs`: parallel lists of tokens, their logprobs, top logprobs and text offsets
        (`tokens` holds every token listed; an entry is None where a token has no logprob, a prompt's first)."""
        texts = [self.text(token) for token in tokens]
        offsets = np.cumsum([0] + [len(t) for t in texts[:-1]]).tolist() if texts else []
        top_logprobs: list[dict[str, float] | None] = []
        for entry in entries:
            if entry is None:
                top_logprobs.append(None)
                continue
            likeliest = {self.text(i): value for i, value in entry.top}
            likeliest.setdefault(self.text(entry.token), entry.logprob)  # OpenAI lists the chosen token too
            top_logprobs.append(likeliest)
        return {
            "tokens": texts,
            "token_logprobs": [None if e is None else e.logprob for e in entries],
            "top_logprobs": top_logprobs,
            "text_offset": offsets,
        }
