"""`lmpack serve` and `lmpack generate`: the runtime half's commands."""

from __future__ import annotations

from pathlib import Path

import click

from lmpack import api
from lmpack.cli.common import emit_json, handle_errors, json_option

_variant_arg = click.argument("variant_dir", type=click.Path(path_type=Path))
_threads = click.option("--threads", type=click.IntRange(min=1), default=None,
                        help="onnxruntime threads per generation (default: onnxruntime's choice).")


@click.command("serve")
@_variant_arg
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Loopback by default; 0.0.0.0 exposes the API to the network.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@_threads
@click.option("--max-concurrency", type=click.IntRange(min=1), default=1, show_default=True,
              help="Generations running at once.")
@click.option("--queue", type=click.IntRange(min=0), default=8, show_default=True,
              help="Requests waiting for a slot; beyond that the server answers 429 with Retry-After.")
@click.option("--api-key-file", type=click.Path(path_type=Path), default=None,
              help="File with accepted API keys, one a line (LMPACK_API_KEYS adds comma-separated keys).")
@click.option("--drain-seconds", type=click.IntRange(min=0), default=30, show_default=True,
              help="On SIGTERM, how long running requests may take to finish.")
@handle_errors
def serve_command(variant_dir, host, port, threads, max_concurrency, queue, api_key_file, drain_seconds) -> None:
    """Answer an OpenAI-compatible HTTP API for the variant in VARIANT_DIR.

    \b
    Examples:
      lmpack serve dist/smollm2-135m-instruct.q4-1-cpu-x86-int8
      lmpack serve dist/all-minilm-l6-v2-cpu-x86-int8 --port 8001     # /v1/embeddings
      LMPACK_API_KEYS=... lmpack serve dist/MODEL --threads 2 --max-concurrency 2 --queue 16

    See docs/serving.md for the endpoints, limits and errors.
    """
    api.serve(variant_dir, host=host, port=port, threads=threads, max_concurrency=max_concurrency, queue=queue,
              api_key_file=api_key_file, drain_seconds=drain_seconds)


@click.command("generate")
@_variant_arg
@click.argument("prompt")
@click.option("--max-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0 is off.")
@click.option("--seed", type=int, default=None, help="Makes sampling reproducible.")
@click.option("--stop", multiple=True, help="Stop sequence (repeatable, at most 4).")
@click.option("--chat", is_flag=True, help="Send PROMPT as a user message through the model's chat template.")
@_threads
@json_option
@handle_errors
def generate_command(variant_dir, prompt, max_tokens, temperature, top_p, top_k, seed, stop, chat, threads,
                     as_json) -> None:
    """Complete PROMPT with the text-generation variant in VARIANT_DIR, without a server.

    The text is printed as it is generated; with --json, one document with the text, the token counts
    and the decode speed.

    \b
    Examples:
      lmpack generate dist/smollm2-135m-instruct.q4-1-cpu-x86-int8 "The history of the railway in England began"
      lmpack generate dist/MODEL "What is the capital of France?" --chat --max-tokens 32
      lmpack generate dist/MODEL "Once upon a time" --temperature 0.8 --seed 1 --json
    """
    on_text = None if as_json else (lambda text: click.echo(text, nl=False))
    result = api.generate(variant_dir, prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                          top_k=top_k, seed=seed, stop=stop, chat=chat, threads=threads, on_text=on_text)
    if as_json:
        emit_json({"text": result.text, "finish_reason": result.finish_reason,
                   "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens},
                   "prefill_seconds": round(result.prefill_seconds, 4),
                   "decode_seconds": round(result.decode_seconds, 4),
                   "decode_tokens_per_second": (round(result.decode_tokens_per_second, 2)
                                                if result.decode_tokens_per_second else None)})
        return
    click.echo()
