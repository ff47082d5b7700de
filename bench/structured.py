"""What response_format costs: decode speed with and without a JSON schema, at one and several rows, in one run.

    python bench/structured.py dist/smollm2-135m-8k-lc100k-mix1-ep2-cpu-x86-int8 [--rows 1 8] [--rounds 4]

Each round runs every case in turn through the server's batcher (as `lmpack serve` does): ROWS greedy
generations of --tokens new tokens at the same moment, free text, then under each schema. A schema's answer
could end before --tokens (its document closed) and leave the others a smaller batch, so the schemas ask for more
than fits (a minimum length, a minimum count): every row decodes exactly --tokens tokens in every case. Speed is
tokens/s of decoding summed over the rows (prefill excluded), median over the rounds; the constrained cases'
ratio to free text is the overhead.
"""

from __future__ import annotations

import argparse
import statistics
import threading
from pathlib import Path

from lmpack.runtime.batcher import Batcher
from lmpack.runtime.engine import DecoderEngine
from lmpack.runtime.grammar import grammar_for
from lmpack.runtime.sampling import SamplingParams
from lmpack.runtime.select import prepare_variant

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Describe the city of Lisbon for a traveller.",
    "Explain how a steam engine works.",
    "Tell me about the history of the printing press.",
    "Write a letter to a friend about a summer holiday.",
    "Summarise the plot of Hamlet.",
    "Describe a day in the life of a baker.",
    "What makes a good cup of tea?",
]
SCHEMAS = {
    # one long string: the mask is computed every token but mostly inside a string
    "string": {"type": "object", "properties": {"story": {"type": "string", "minLength": 4000}}, "required": ["story"]},
    # many short fields: keys, numbers and punctuation, where the grammar decides most tokens
    "records": {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "maxLength": 12},
                        "year": {"type": "integer"},
                        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}},
                    },
                    "required": ["name", "year", "tags"],
                },
                "minItems": 100,
            }
        },
        "required": ["items"],
    },
}


def run_case(engine: DecoderEngine, batcher: Batcher, rows: int, tokens: int, grammar: str | None) -> float:
    """Decode tokens/s summed over `rows` generations run together."""
    results: list = [None] * rows

    def one(i: int) -> None:
        ids = engine.encode_chat([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
        params = SamplingParams(max_tokens=tokens, temperature=0.0, grammar=grammar)
        results[i] = engine.generate(ids, params, loop=batcher).result()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(rows)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum((r.completion_tokens - 1) / r.decode_seconds for r in results if r.decode_seconds > 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", type=Path)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    engine = DecoderEngine(prepare_variant(args.variant), threads=args.threads)
    cases = {"free text": None, **{name: grammar_for(_format(schema)) for name, schema in SCHEMAS.items()}}
    engine.grammars.constraint(cases["string"] or "")  # the vocabulary is read once, before any timing
    print("| rows | case | decode tok/s (median) | against free text |")
    print("|---|---|---|---|")
    for rows in args.rows:
        batcher = Batcher(engine.runner, max_batch=rows)
        speeds: dict[str, list[float]] = {name: [] for name in cases}
        try:
            run_case(engine, batcher, rows, 8, None)  # warm-up
            for _ in range(args.rounds):
                for name, grammar in cases.items():
                    speeds[name].append(run_case(engine, batcher, rows, args.tokens, grammar))
        finally:
            batcher.stop()
        free = statistics.median(speeds["free text"])
        for name, values in speeds.items():
            median = statistics.median(values)
            print(f"| {rows} | {name} | {median:.1f} | {median / free:.3f} |")


def _format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "bench", "schema": schema}}


if __name__ == "__main__":
    main()
