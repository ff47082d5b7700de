"""`lmpack serve` and `lmpack generate`: the runtime half's commands."""

from __future__ import annotations

from pathlib import Path

import click

from lmpack import api
from lmpack.cli.common import emit_json, handle_errors, json_option

_variant_arg = click.argument("variant_dir", metavar="PATH", type=click.Path(path_type=Path))
_variant_name = click.option("--variant", "variant", metavar="NAME", default=None,
                             help="Use this variant of a bundle or release (its name in `lmpack doctor`) instead "
                                  "of the one lmpack would choose; it must still run on this host.")
_threads = click.option("--threads", type=click.IntRange(min=1), default=None,
                        help="onnxruntime threads per generation (default: onnxruntime's choice).")


@click.command("serve")
@click.argument("path", type=click.Path(path_type=Path))
@_variant_name
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None,
              help="serve.toml with any of the settings below; flags and LMPACK_SERVE_* override it.")
@click.option("--host", default=None,
              help="Address to bind [default: 127.0.0.1]. 0.0.0.0 exposes the API to the network.")
@click.option("--port", type=click.IntRange(0, 65535), default=None, help="[default: 8000]")
@_threads
@click.option("--max-concurrency", type=click.IntRange(min=1), default=None,
              help="Generations running at once (with batching: sequences in the batch) [default: 1].")
@click.option("--max-batch", type=click.IntRange(1, 256), default=None,
              help="Most sequences one decode step runs together; 1 runs each generation alone [default: 8].")
@click.option("--batch-align", type=click.IntRange(1, 64), default=None,
              help="A sequence joins the batch when its length agrees with the batch's modulo this, which keeps "
                   "answers identical to unbatched ones; 1 joins at once, but int8 answers may then differ "
                   "[default: 4].")
@click.option("--queue", type=click.IntRange(min=0), default=None,
              help="Requests waiting for a slot; beyond that the server answers 429 [default: 8].")
@click.option("--api-key-file", type=click.Path(path_type=Path), default=None,
              help="File with accepted API keys, one a line (LMPACK_API_KEYS adds comma-separated keys).")
@click.option("--drain-seconds", type=click.IntRange(min=0), default=None,
              help="On SIGTERM, how long running requests may take to finish [default: 30].")
@click.option("--tls-cert", type=click.Path(path_type=Path), default=None, help="PEM certificate: serve HTTPS.")
@click.option("--tls-key", type=click.Path(path_type=Path), default=None, help="PEM private key for --tls-cert.")
@click.option("--cache/--no-cache", default=None,
              help="Replay answers to repeated deterministic requests (greedy or seeded) [default: off].")
@click.option("--strict/--no-strict", default=None,
              help="Refuse to start rather than serve a variant whose TensorRT engine does not fit this host "
                   "(and cannot be rebuilt) on the CUDA provider or the CPU [default: off].")
@click.option("--engine-rebuild/--no-engine-rebuild", default=None,
              help="Rebuild a TensorRT engine that does not fit this host from the variant's ONNX, once, and "
                   "cache it [default: on].")
@click.option("--engine-cache-dir", type=click.Path(path_type=Path), default=None,
              help="Where rebuilt engines are kept [default: PREFIX/releases/NAME/.engines, beside the release].")
@handle_errors
def serve_command(path, variant, config_file, host, port, threads, max_concurrency, max_batch, batch_align, queue,
                  api_key_file, drain_seconds, tls_cert, tls_key, cache, strict, engine_rebuild,
                  engine_cache_dir) -> None:
    """Answer an OpenAI-compatible HTTP API for the variant at PATH that suits this host.

    PATH is a variant directory, an unpacked bundle, or an installed release (PREFIX/releases/NAME,
    its `current` or a VERSION directory); `lmpack doctor PATH` shows which variant would be chosen and why.

    \b
    Examples:
      lmpack serve dist/smollm2-135m-instruct.q4-1-cpu-x86-int8
      lmpack serve /opt/lmpack/releases/smollm2 --config /etc/lmpack/serve.toml
      lmpack serve /opt/lmpack/releases/smollm2 --variant smollm2-135m-instruct.q4-1-cpu-x86-int4
      lmpack serve dist/MODEL --tls-cert server.crt --tls-key server.key --cache
      LMPACK_API_KEYS=... lmpack serve dist/MODEL --threads 2 --max-concurrency 8 --queue 16

    See docs/serving.md for the endpoints, settings, limits and errors.
    """
    api.serve(path, config_file=config_file, variant=variant, host=host, port=port, threads=threads,
              max_concurrency=max_concurrency, max_batch=max_batch, batch_align=batch_align, queue=queue,
              api_key_file=api_key_file, drain_seconds=drain_seconds, tls_cert=tls_cert, tls_key=tls_key,
              cache=cache, strict=strict, engine_rebuild=engine_rebuild, engine_cache_dir=engine_cache_dir)


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
@_variant_name
@_threads
@json_option
@handle_errors
def generate_command(variant_dir, prompt, max_tokens, temperature, top_p, top_k, seed, stop, chat, variant, threads,
                     as_json) -> None:
    """Complete PROMPT with the text-generation variant at PATH (chosen for this host as `serve` does), without a server.

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
                          top_k=top_k, seed=seed, stop=stop, chat=chat, threads=threads, variant=variant,
                          on_text=on_text)
    if as_json:
        emit_json({"text": result.text, "finish_reason": result.finish_reason,
                   "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens},
                   "prefill_seconds": round(result.prefill_seconds, 4),
                   "decode_seconds": round(result.decode_seconds, 4),
                   "decode_tokens_per_second": (round(result.decode_tokens_per_second, 2)
                                                if result.decode_tokens_per_second else None)})
        return
    click.echo()
