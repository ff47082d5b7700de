"""Time to first token with and without a cached prefix: a long shared system prompt, then a short question.

    python bench/prefix_cache.py dist/smollm2-135m-8k-lc100k-mix1-ep2-cpu-x86-int8 [--system-tokens 1000] [--rounds 5]

Each round asks a new question after the same system prompt (about --system-tokens tokens of lmpack's evaluation
text) twice: once with no prefix cache (the whole prompt runs), once through a prefix cache that already holds
the system prompt from an earlier question (only the last partial block and the question run). Time to first token
is the prefill's time in-process (no HTTP), median over the rounds; the greedy answers of both must be the same.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from lmpack.data import all_eval_text
from lmpack.runtime.engine import DecoderEngine
from lmpack.runtime.prefix_cache import PrefixCache
from lmpack.runtime.sampling import SamplingParams
from lmpack.runtime.select import prepare_variant

QUESTIONS = [
    "Summarise the text above in one sentence.",
    "Which domain is the text above from?",
    "Name one word the text above uses often.",
    "Is the text above formal or informal?",
    "What would a good title for the text above be?",
    "Who might have written the text above?",
]


def system_prompt(engine: DecoderEngine, tokens: int) -> str:
    text = all_eval_text()
    ids = engine.tokenizer.encode(text, add_special_tokens=False).ids[:tokens]
    return engine.tokenizer.decode(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", type=Path)
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    engine = DecoderEngine(prepare_variant(args.variant), threads=args.threads)
    system = system_prompt(engine, args.system_tokens)
    cache = PrefixCache(max_bytes=1 << 30)
    params = SamplingParams(max_tokens=16, temperature=0)

    def ids(question: str) -> list[int]:
        return engine.encode_chat([{"role": "system", "content": system}, {"role": "user", "content": question}])

    engine.generate(ids("Warm up."), params, prefix_cache=cache).result()  # the system prompt enters the cache
    misses, hits, reused = [], [], 0
    for question in QUESTIONS[: args.rounds]:
        prompt = ids(question)
        alone = engine.generate(prompt, params).result()
        shared = engine.generate(prompt, params, prefix_cache=cache)
        result = shared.result()
        if result.text != alone.text:
            raise SystemExit(f"the answers differ for {question!r}: {alone.text!r} / {result.text!r}")
        misses.append(alone.prefill_seconds)
        hits.append(result.prefill_seconds)
        reused = shared.cached_tokens
    miss, hit = statistics.median(misses), statistics.median(hits)
    print(f"prompt {len(prompt)} tokens, {reused} from the prefix cache ({cache.bytes / 1e6:.1f} MB held)")
    print("| case | time to first token (median) |")
    print("|---|---|")
    print(f"| whole prompt | {miss * 1000:.1f} ms |")
    print(f"| cached prefix | {hit * 1000:.1f} ms |")
    print(f"\n{miss / hit:.1f}x lower with the cached prefix; greedy answers identical in all {len(hits)} rounds")


if __name__ == "__main__":
    main()
