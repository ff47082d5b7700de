"""Token choice and the request bounds shared by the server and `lmpack generate`."""

from __future__ import annotations

import numpy as np
import pytest

from lmpack.errors import RequestError
from lmpack.runtime.sampling import Sampler, SamplingParams

LOGITS = np.log(np.array([0.05, 0.6, 0.25, 0.1], dtype=np.float32))


def test_greedy_takes_the_argmax():
    assert Sampler(SamplingParams(temperature=0), [])(LOGITS) == 1
    assert Sampler(SamplingParams(temperature=1.0, top_k=1), [])(LOGITS) == 1


def test_a_seed_reproduces_the_samples():
    first, second = (Sampler(SamplingParams(temperature=1.0, seed=7), []) for _ in range(2))
    assert [first(LOGITS) for _ in range(50)] == [second(LOGITS) for _ in range(50)]
    negative = Sampler(SamplingParams(temperature=1.0, seed=-(2**63)), [])  # OpenAI allows any 64-bit seed
    assert negative(LOGITS) in range(4)
    sampler = Sampler(SamplingParams(temperature=1.0, seed=7), [])
    counts = np.bincount([sampler(LOGITS) for _ in range(2000)], minlength=4) / 2000
    assert abs(counts[1] - 0.6) < 0.05 and abs(counts[2] - 0.25) < 0.05


def test_top_p_and_top_k_cut_the_tail():
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.8, seed=1), [])
    assert set(sampler(LOGITS) for _ in range(300)) == {1, 2}  # 0.6 + 0.25 reaches 0.8
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=3, seed=1), [])
    assert 0 not in {sampler(LOGITS) for _ in range(300)}


def nucleus(probs: np.ndarray, top_p: float) -> set[int]:
    """The reference: sort everything, keep the most likely tokens until their mass reaches top_p."""
    order = np.argsort(probs)[::-1]
    keep = int(np.searchsorted(np.cumsum(probs[order]), top_p * probs.sum())) + 1
    return set(order[:keep].tolist())


def test_top_p_over_a_large_vocabulary_keeps_exactly_the_nucleus():
    """A peaked distribution (nucleus found among the first guesses) and a slowly falling one whose nucleus
    holds over a thousand tokens (the whole vocabulary is sorted): both sample only from the nucleus,
    in proportion to the probabilities."""
    peaked = np.full(4096, 0.05 / 4093)
    peaked[[10, 20, 30]] = [0.5, 0.3, 0.15]
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.9, seed=3), [])
    draws = np.array([sampler(np.log(peaked).astype(np.float32)) for _ in range(3000)])
    assert set(draws.tolist()) == nucleus(peaked, 0.9) == {10, 20, 30}
    assert abs(np.mean(draws == 10) - 0.5 / 0.95) < 0.04 and abs(np.mean(draws == 30) - 0.15 / 0.95) < 0.03

    falling = np.arange(4096, 0, -1, dtype=np.float64)
    falling = np.random.default_rng(0).permutation(falling / falling.sum())
    expected = nucleus(falling, 0.5)
    assert len(expected) > 1024
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.5, seed=4), [])
    logits = np.log(falling).astype(np.float32)
    draws = {sampler(logits) for _ in range(6000)}
    assert draws <= expected and len(draws) > 1024


def test_sampling_without_a_cut_follows_the_whole_distribution():
    probs = np.random.default_rng(5).dirichlet(np.ones(2000) * 0.05)
    sampler = Sampler(SamplingParams(temperature=1.0, seed=6), [])
    draws = np.array([sampler(np.log(probs).astype(np.float32)) for _ in range(20000)])
    top = np.argsort(probs)[::-1][:5]
    for token in top:  # the likeliest tokens are drawn as often as they should be
        assert abs(np.mean(draws == token) - probs[token]) < 0.015


def test_repetition_penalty_discourages_seen_tokens():
    sampler = Sampler(SamplingParams(temperature=0, repetition_penalty=2.0), prompt_ids=[1])
    logits = np.array([0.0, 2.0, 1.5, 0.0], dtype=np.float32)
    assert sampler(logits) == 2
    sampler = Sampler(SamplingParams(temperature=0, frequency_penalty=2.0), prompt_ids=[])
    sampler.accept(1)
    assert sampler(logits) == 2


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_tokens", 0),
        ("max_tokens", 10**6),
        ("temperature", -0.1),
        ("temperature", 2.5),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.1),
        ("top_k", -1),
        ("top_k", 2.5),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 3),
        ("frequency_penalty", -3),
        ("stop", ("a", "b", "c", "d", "e")),
        ("stop", ("",)),
        ("temperature", True),
    ],
)
def test_out_of_bounds_values_name_their_field(field, value):
    with pytest.raises(RequestError) as info:
        SamplingParams(**{field: value}).check(max_tokens_limit=4096)
    assert info.value.param == field
