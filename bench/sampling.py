"""Cost of choosing a token by sampling, on real logits: lmpack's sampler against sorting the whole vocabulary.

    python bench/sampling.py dist/smollm2-135m-8k-lc100k-mix1-ep2-cpu-x86-int8 [--tokens 100]

Generates --tokens tokens with the variant (temperature 0.8, seed 1) and keeps each step's logits, then
times, for several parameter sets, lmpack's Sampler and the textbook way (sort every logit, softmax,
cut the top-p tail, Generator.choice) over the same vectors, in one run. Prints ms per token.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from lmpack.runtime import sampling
from lmpack.runtime.engine import DecoderEngine
from lmpack.runtime.select import prepare_variant

PROMPT = "The history of the railway in England began"
SETS = [{}, {"temperature": 0.7, "top_p": 0.9}, {"top_p": 0.95}, {"top_k": 40}, {"top_k": 40, "top_p": 0.9}]


def sort_everything(logits: np.ndarray, params: sampling.SamplingParams, rng: np.random.Generator) -> int:
    """The reference: a full sort of the vocabulary for every token."""
    logits = logits / params.temperature
    candidates = np.arange(logits.shape[0])
    if params.top_k:
        candidates = np.argpartition(logits, -params.top_k)[-params.top_k :]
        logits = logits[candidates]
    order = np.argsort(logits)[::-1]
    logits, candidates = logits[order], candidates[order]
    probs = np.exp(logits - logits[0])
    probs /= probs.sum()
    if params.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p)) + 1
        probs, candidates = probs[:keep] / probs[:keep].sum(), candidates[:keep]
    return int(candidates[rng.choice(len(probs), p=probs)])


def capture(variant: Path, tokens: int) -> list[np.ndarray]:
    captured: list[np.ndarray] = []
    original = sampling.Sampler.__call__

    def record(self, logits):
        captured.append(logits.copy())
        return original(self, logits)

    engine = DecoderEngine(prepare_variant(variant), threads=2)
    sampling.Sampler.__call__ = record
    try:
        params = sampling.SamplingParams(max_tokens=tokens, temperature=0.8, seed=1)
        engine.generate(engine.encode_prompt(PROMPT), params).result(None)
    finally:
        sampling.Sampler.__call__ = original
    return captured


def per_token_ms(choose, vectors: list[np.ndarray], rounds: int = 3) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for logits in vectors:
            choose(logits)
        best = min(best, (time.perf_counter() - started) / len(vectors) * 1000)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", type=Path)
    parser.add_argument("--tokens", type=int, default=100)
    args = parser.parse_args()
    vectors = capture(args.variant, args.tokens)
    print(f"{len(vectors)} logit vectors of {vectors[0].shape[0]} tokens")
    print("| parameters | lmpack ms/token | full sort ms/token |")
    print("|---|---|---|")
    for fields in SETS:
        params = sampling.SamplingParams(**fields)
        sampler = sampling.Sampler(params, [])
        rng = np.random.default_rng(0)
        ours = per_token_ms(sampler, vectors)
        reference = per_token_ms(lambda logits, params=params, rng=rng: sort_everything(logits, params, rng), vectors)
        print(f"| {fields or 'temperature 1, no cut'} | {ours:.2f} | {reference:.2f} |")


if __name__ == "__main__":
    main()
