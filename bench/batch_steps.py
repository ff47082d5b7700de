"""What a batched decode step costs against a one-row step, in one process: the ceiling of batching.

    python bench/batch_steps.py dist/smollm2-135m-8k-lc100k-mix1-ep2-cpu-x86-int8 [--rows 1 2 4 8] [--rounds 3] \
        [--prompt-tokens 40]

For each row count it prefills that many random prompts (40, 43, 46, ... tokens; --prompt-tokens sets the
first, so long pasts show what attention and the KV cache's precision cost), joins them into one
batch and times 30 batched steps; the best of --rounds rounds (the row counts taking turns) is kept.
Prints ms a step, tokens/s, and tokens/s against one row: what 8 concurrent clients could reach at
best, before prefills, HTTP and the clients' own work.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from lmpack.runtime.select import prepare_variant
from lmpack.runtime.sessions import DecoderRunner, KVCache


def step_ms(runner: DecoderRunner, rows: int, rng: np.random.Generator, prompt: int, steps: int = 30) -> float:
    batch = runner.new_batch()
    for i in range(rows):
        cache = KVCache()
        runner.step(rng.integers(100, 2000, prompt + 3 * i).tolist(), cache)
        batch.join(cache)
    tokens = [5] * rows
    runner.step_batch(tokens, batch)
    started = time.perf_counter()
    for _ in range(steps):
        runner.step_batch(tokens, batch)
    return (time.perf_counter() - started) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", type=Path)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=40)
    args = parser.parse_args()
    variant = prepare_variant(args.variant)
    runner = DecoderRunner(variant.onnx_path, threads=args.threads, kv_padding=variant.info.get("kv_padding", "left"))
    rng = np.random.default_rng(0)
    best = {rows: float("inf") for rows in args.rows}
    for _ in range(args.rounds):
        for rows in args.rows:
            best[rows] = min(best[rows], step_ms(runner, rows, rng, args.prompt_tokens))
    one = best[min(args.rows)] / min(args.rows)
    print("| rows | ms a step | tokens/s | against one row |")
    print("|---|---|---|---|")
    for rows, ms in best.items():
        print(f"| {rows} | {ms:.2f} | {rows / ms * 1000:.0f} | {rows * one / ms:.2f}x |")


if __name__ == "__main__":
    main()
