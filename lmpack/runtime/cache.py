"""An in-memory response cache for deterministic generations (greedy, or sampled with a fixed seed).

Why it is safe: the engine gives the same text for the same model, prompt and parameters when decoding
is greedy or the seed is fixed (docs/serving.md: "the same seed and request give the same text"), so a
stored answer is the answer. A sampled request without a seed is meant to differ each time and is never
cached. The key holds the model version (the variant's digest), so a cache can never replay another
model's answer. Entries keep the streamed pieces, so a replayed stream sends the same chunks.

Bounded by entries and by bytes, least recently used first out; a lock guards it because streaming
answers are stored from worker threads.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

from lmpack.runtime.sampling import SamplingParams

_ENTRY_OVERHEAD = 256  # bytes charged per entry besides its text: key, counts, bookkeeping
CACHEABLE_FINISH = ("stop", "length")  # a cancelled or failed generation is not an answer


@dataclass(frozen=True)
class CachedAnswer:
    chunks: tuple[str, ...]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    @property
    def size(self) -> int:
        return sum(len(c.encode("utf-8")) for c in self.chunks) + _ENTRY_OVERHEAD


def usage_counts(done: Any) -> tuple[int, int]:
    """(prompt_tokens, completion_tokens) of a finished Generation or Completion."""
    return done.prompt_tokens, done.completion_tokens


def cacheable(params: SamplingParams) -> bool:
    """Only requests whose answer is fixed (greedy, or sampled with a seed) and is text alone (no logprobs)."""
    return (params.greedy or params.seed is not None) and params.logprobs is None


def cache_key(*, model_version: str, chat: bool, prompt: Any, params: SamplingParams) -> str:
    """sha256 over the model version, the route, the prompt or messages and every generation parameter."""
    document = {"model": model_version, "chat": chat, "prompt": prompt, "params": asdict(params)}
    return hashlib.sha256(json.dumps(document, sort_keys=True, ensure_ascii=True).encode("ascii")).hexdigest()


class ResponseCache:
    def __init__(self, *, max_entries: int, max_bytes: int):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: OrderedDict[str, CachedAnswer] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def entries(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes

    def get(self, key: str) -> CachedAnswer | None:
        with self._lock:
            answer = self._entries.get(key)
            if answer is not None:
                self._entries.move_to_end(key)
            return answer

    def put(self, key: str, answer: CachedAnswer) -> bool:
        """Store `answer` unless it is not a whole answer or larger than the whole cache; evict LRU to fit."""
        if answer.finish_reason not in CACHEABLE_FINISH or answer.size > self.max_bytes or self.max_entries < 1:
            return False
        with self._lock:
            if (old := self._entries.pop(key, None)) is not None:
                self._bytes -= old.size
            while self._entries and (
                len(self._entries) >= self.max_entries or self._bytes + answer.size > self.max_bytes
            ):
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.size
            self._entries[key] = answer
            self._bytes += answer.size
        return True
