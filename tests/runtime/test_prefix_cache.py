"""Prefix caching: shared leading blocks found and reused, greedy answers unchanged, memory bounded, counted."""

from __future__ import annotations

import re

import numpy as np
import pytest

from lmpack.runtime.engine import DecoderEngine
from lmpack.runtime.prefix_cache import PrefixCache
from lmpack.runtime.sampling import SamplingParams
from lmpack.runtime.sessions import KVCache
from lmpack.runtime.variant import load_variant

SYSTEM = "You are a railway historian. " * 12  # a system prompt of a few blocks at the tiny model's vocabulary


def _values(length: int, fill: float = 1.0) -> dict[str, np.ndarray]:
    return {"past.0.key": np.full((1, 2, length, 4), fill, dtype=np.float32)}


def _prefilled(length: int) -> KVCache:
    return KVCache(length=length, values=_values(length))


def test_the_longest_cached_prefix_is_found_by_whole_blocks():
    cache = PrefixCache(max_bytes=1 << 20, block=8)
    first = list(range(30))
    cache.store(first, _prefilled(30))  # blocks of 8 before the last token: 24 tokens kept
    hit = cache.lookup(first)
    assert hit is not None and hit.length == 24 and hit.values["past.0.key"].shape == (1, 2, 24, 4)
    shares_two_blocks = list(range(19)) + [999] * 10
    assert cache.lookup(shares_two_blocks).length == 16
    assert cache.lookup([5] + list(range(1, 30))) is None  # differs in the first block
    assert cache.lookup(list(range(8))) is None  # nothing before its last token fills a block
    hit.values["past.0.key"][:] = 7  # a hit is the caller's own copy
    assert cache.lookup(first).values["past.0.key"].max() == 1
    assert (cache.hits, cache.misses, cache.hit_tokens) == (3, 2, 24 + 16 + 24)


def test_least_recently_used_prefixes_leave_first_within_the_budget():
    entry_bytes = _values(16)["past.0.key"].nbytes
    cache = PrefixCache(max_bytes=2 * entry_bytes, block=8)
    prompts = [[p] * 20 for p in range(3)]
    cache.store(prompts[0], _prefilled(20))
    cache.store(prompts[1], _prefilled(20))
    assert cache.lookup(prompts[0]) is not None  # used: now the most recent
    cache.store(prompts[2], _prefilled(20))  # over budget: prompts[1] goes
    assert cache.bytes <= cache.max_bytes and cache.entries == 2
    assert cache.lookup(prompts[1]) is None and cache.lookup(prompts[0]) and cache.lookup(prompts[2])


@pytest.mark.parametrize("variant_fixture", ["llama_variant", "llama_variant_optimum"])
def test_greedy_answers_are_the_same_with_a_cached_prefix(variant_fixture, request):
    engine = DecoderEngine(load_variant(request.getfixturevalue(variant_fixture)), threads=1)
    cache = PrefixCache(max_bytes=64 << 20)
    params = SamplingParams(max_tokens=40, temperature=0)
    questions = ["Which railway opened in 1825?", "Who built the Rocket?", "Which railway opened in 1825?"]
    for question in questions:
        ids = engine.encode_chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}])
        assert len(ids) > 2 * cache.block
        alone = engine.generate(ids, params).result()
        shared = engine.generate(ids, params, prefix_cache=cache)
        assert shared.result().text == alone.text
    assert cache.hits == 2 and shared.cached_tokens >= 2 * cache.block  # the second and third found the system prompt


def test_the_server_counts_hits_and_reused_tokens(llama_server):
    body = {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}], "max_tokens": 2}
    with llama_server.client() as http:
        http.post("/v1/chat/completions", json=body)
        before = http.get("/metrics").text
        http.post("/v1/chat/completions", json=body)
        after = http.get("/metrics").text

    def value(text, name):
        match = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    assert value(after, "lmpack_prefix_cache_hits_total") - value(before, "lmpack_prefix_cache_hits_total") == 1
    assert value(after, "vllm:prefix_cache_hits_total") - value(before, "vllm:prefix_cache_hits_total") >= 64
    assert value(after, "lmpack_prefix_cache_bytes") > 0
