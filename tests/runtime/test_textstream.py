"""Incremental detokenization and stop sequences: what a streaming client sees."""

from __future__ import annotations

import pytest

from lmpack.runtime.textstream import IncrementalDecoder, StopMatcher
from lmpack.runtime.variant import load_variant

TEXT = "Trains 🚂 ran from Stockton — to Darlington in 1825; 鉄道 means railway. Ünïcödé!"


def test_streamed_text_never_splits_a_character(llama_variant):
    tokenizer = load_variant(llama_variant).tokenizer()
    prompt = tokenizer.encode("The railway", add_special_tokens=False).ids
    ids = tokenizer.encode(TEXT, add_special_tokens=False).ids
    assert len(ids) > len(TEXT.encode()) / 3, "the test needs a tokenizer that splits characters into bytes"
    decoder = IncrementalDecoder(tokenizer, prompt)
    deltas = [decoder.push(token) for token in ids] + [decoder.flush()]
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == tokenizer.decode(ids) == TEXT
    assert "" in deltas  # some tokens completed no character on their own


def test_an_incomplete_character_at_the_end_is_flushed(llama_variant):
    tokenizer = load_variant(llama_variant).tokenizer()
    ids = tokenizer.encode("🚂", add_special_tokens=False).ids
    assert len(ids) > 1
    decoder = IncrementalDecoder(tokenizer, [])
    assert [decoder.push(t) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert decoder.flush() != ""


@pytest.mark.parametrize(
    "deltas, stops, shown",
    [
        (["Hel", "lo wo", "rld"], ("o w",), "Hell"),
        (["ab", "c##", "#d"], ("###",), "abc"),
        (["no stop ", "here"], ("zzz",), "no stop here"),
        (["x", "y"], (), "xy"),
        (["keep <", "/s", "> after"], ("</s>",), "keep "),
    ],
)
def test_stop_sequences_cut_across_deltas(deltas, stops, shown):
    matcher = StopMatcher(stops)
    out = "".join(matcher.push(d) for d in deltas) + matcher.flush()
    assert out == shown
    assert matcher.stopped == any(s in "".join(deltas) for s in stops)


def test_a_possible_stop_prefix_is_held_back_then_released():
    matcher = StopMatcher(("END",))
    assert matcher.push("the E") == "the "
    assert matcher.push("N") == ""
    assert matcher.push("x") == "ENx"
    assert not matcher.stopped
