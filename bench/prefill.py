"""Long prompts arriving together at a busy batcher: time to first token and the running streams' token gaps, with
prompts run whole against run in chunks between decode steps (the serve setting prefill_chunk), in one process.

    python bench/prefill.py dist/smollm2-135m-8k-lc100k-mix1-ep2-cpu-x86-int8 [--prompts 8] [--prompt-tokens 1000]

Each case sends --prompts prompts of about --prompt-tokens tokens (different slices of lmpack's evaluation text)
at the same moment to a batcher of that many rows, each asking 48 greedy tokens; so while later prompts are
prefilled, the earlier ones are the running streams. Reports time to first token (median and max) and the gaps
between two tokens of one stream (p50, p99, max) over all streams; the answers must be the same in both cases.
"""

from __future__ import annotations

import argparse
import statistics
import threading
from pathlib import Path

import numpy as np

from lmpack.data import all_eval_text
from lmpack.runtime.batcher import Batcher
from lmpack.runtime.engine import DecoderEngine
from lmpack.runtime.sampling import SamplingParams
from lmpack.runtime.select import prepare_variant


def run(engine: DecoderEngine, prompts: list[list[int]], chunk: int) -> tuple[list, list]:
    batcher = Batcher(engine.runner, max_batch=len(prompts), prefill_chunk=chunk)
    generations = [engine.generate(ids, SamplingParams(max_tokens=48, temperature=0), loop=batcher) for ids in prompts]
    results: list = [None] * len(prompts)

    def one(i: int) -> None:
        results[i] = generations[i].result()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        batcher.stop()
    return generations, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", type=Path)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    engine = DecoderEngine(prepare_variant(args.variant), threads=args.threads)
    text = engine.tokenizer.encode(all_eval_text(), add_special_tokens=False).ids
    prompts = [text[i * 97 : i * 97 + args.prompt_tokens] for i in range(args.prompts)]
    print(f"{args.prompts} prompts of {args.prompt_tokens} tokens at once, 48 tokens each, {args.threads} threads")
    print("| prefill | time to first token, median / max | token gaps p50 / p99 / max | whole run |")
    print("|---|---|---|---|")
    answers = {}
    for chunk in (0, args.chunk):
        generations, results = run(engine, prompts, chunk)
        first = [g.decoding.first_token_at - g.created for g in generations]
        gaps = np.array([gap for g in generations for gap in g.decoding.token_gaps])
        whole = max(g.decoding._last_token_at for g in generations) - min(g.created for g in generations)
        answers[chunk] = [r.text for r in results]
        label = "whole prompts" if chunk == 0 else f"chunks of {chunk}"
        p50, p99, top = (np.percentile(gaps, 50) * 1000, np.percentile(gaps, 99) * 1000, gaps.max() * 1000)
        ttft = f"{statistics.median(first):.2f} s / {max(first):.2f} s"
        print(f"| {label} | {ttft} | {p50:.0f} / {p99:.0f} / {top:.0f} ms | {whole:.1f} s |")
    same = answers[0] == answers[args.chunk]
    print(f"\nanswers {'identical' if same else 'DIFFERENT'} in both cases")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
