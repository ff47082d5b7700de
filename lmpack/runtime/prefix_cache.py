"""Prefix caching: the KV rows of a prompt's leading blocks, kept so a later prompt that starts the same way (the
same system prompt, the previous turns of a conversation) runs only what differs.

Prompts are cut into blocks of BLOCK tokens, as vLLM's automatic prefix caching does. After a prompt is run, its
KV rows up to its last whole block (not the last token: its logits are needed) are copied and kept, findable by
the hash of every block boundary's tokens, so a prompt sharing only the first blocks finds them too. A prompt
looks for its longest cached prefix, copies those rows into its own cache and runs the rest. Entries are dropped
least recently used first once their bytes pass the budget. The pasts are copied in and out, never shared, so a
generation may write its cache in place (sessions.py) without touching the entry.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from lmpack.runtime.sessions import KVCache

# Tokens a reused prefix is counted in. Smaller blocks find longer prefixes but keep more keys; vLLM's default is
# 16 on a GPU, where a block is a page of its KV pool; here a block is only a unit of lookup, so 64 keeps the
# index small for long prompts at the cost of rerunning at most 63 shared tokens.
BLOCK = 64


@dataclass
class _Entry:
    length: int
    values: dict[str, np.ndarray]  # each [1, kv_heads, length, head_dim]
    nbytes: int
    keys: list[bytes] = field(default_factory=list)


@dataclass(frozen=True)
class Hit:
    length: int  # prompt tokens whose rows were found
    values: dict[str, np.ndarray]  # fresh copies of those rows, the caller's own


class PrefixCache:
    """Thread-safe: the batcher's worker and the solo loop's threads look up and store concurrently."""

    def __init__(self, *, max_bytes: int, block: int = BLOCK):
        self.max_bytes, self.block = max_bytes, block
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._index: dict[bytes, tuple[int, int]] = {}  # block boundary's hash -> (entry, length)
        self._next = 0
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = 0  # lookups
        self.queried_tokens = self.hit_tokens = 0  # prompt tokens looked up, and found (vLLM's counters)

    @property
    def entries(self) -> int:
        return len(self._entries)

    def _boundaries(self, ids: Sequence[int]) -> list[tuple[int, bytes]]:
        """(length, hash of the first `length` tokens) for each whole block before the prompt's last token."""
        digest, out = hashlib.sha256(), []
        tokens = np.asarray(ids, dtype=np.int64)
        usable = (len(ids) - 1) // self.block * self.block
        for start in range(0, usable, self.block):
            digest.update(tokens[start : start + self.block].tobytes())
            out.append((start + self.block, digest.copy().digest()))
        return out

    def lookup(self, ids: Sequence[int]) -> Hit | None:
        boundaries = self._boundaries(ids)
        with self._lock:
            self.queried_tokens += len(ids)
            for length, key in reversed(boundaries):
                found = self._index.get(key)
                if found is None or found[0] not in self._entries:
                    continue
                entry = self._entries[found[0]]
                self._entries.move_to_end(found[0])
                self.hits += 1
                self.hit_tokens += length
                return Hit(length, {name: value[:, :, :length].copy() for name, value in entry.values.items()})
            self.misses += 1
            return None

    def store(self, ids: Sequence[int], cache: KVCache, *, known: int = 0) -> None:
        """Keep the rows of `ids`' whole blocks from `cache` (just prefilled with them), unless no more than `known`
        of them (already found in the cache) would be new."""
        boundaries = self._boundaries(ids)
        if not boundaries or boundaries[-1][0] <= known:
            return
        length = boundaries[-1][0]
        rows = {name: array.copy() for name, array in cache.past(length).items()}
        nbytes = sum(array.nbytes for array in rows.values())
        if nbytes > self.max_bytes:
            return
        with self._lock:
            ident, self._next = self._next, self._next + 1
            entry = _Entry(length, rows, nbytes, [key for _, key in boundaries])
            self._entries[ident] = entry
            for at, key in boundaries:
                self._index[key] = (ident, at)
            self.bytes += nbytes
            while self.bytes > self.max_bytes and self._entries:
                _, dropped = self._entries.popitem(last=False)
                self.bytes -= dropped.nbytes
                for key in dropped.keys:
                    if self._index.get(key, (None,))[0] not in self._entries:
                        self._index.pop(key, None)
