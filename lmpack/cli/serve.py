"""`lmpack serve` and `lmpack generate`: the runtime half's commands."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from lmpack import api
from lmpack.cli.common import emit_json, handle_errors, json_option
from lmpack.config.serve import SettingInfo, serve_setting, serve_settings

_variant_arg = click.argument("variant_dir", metavar="PATH", type=click.Path(path_type=Path))


def setting_option(info: SettingInfo) -> Callable[[Callable], Callable]:
    """The option of one ServeSettings field: typed, bounded and described by the field itself; unset is None,
    so the file and LMPACK_SERVE_* keep what a flag does not override."""
    help_text = f"{info.help} [default: {info.shown_default}]"
    if info.kind is bool:
        return click.option(f"{info.flag}/--no-{info.flag[2:]}", info.name, default=None, help=help_text)
    if info.kind is int:
        low, high = info.meta.bounds or (None, None)
        return click.option(
            info.flag, info.name, type=click.IntRange(low, high), default=None, metavar="N", help=help_text
        )
    if info.kind is tuple:
        return click.option(info.flag, info.name, multiple=True, metavar="NAME", help=f"{help_text} (repeatable)")
    if info.kind is Path:
        return click.option(
            info.flag, info.name, type=click.Path(path_type=Path), default=None, metavar="PATH", help=help_text
        )
    return click.option(info.flag, info.name, default=None, metavar="TEXT", help=help_text)


def serve_setting_options(func: Callable) -> Callable:
    """One option per ServeSettings field, in the class's order."""
    for info in reversed(serve_settings()):
        func = setting_option(info)(func)
    return func


@click.command("serve")
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path),
    default=None,
    help="serve.toml with any of the settings below; LMPACK_SERVE_* variables and flags override it.",
)
@serve_setting_options
@handle_errors
def serve_command(path: Path, config_file: Path | None, **settings: Any) -> None:
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
    api.serve(path, config_file=config_file, **settings)


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
@setting_option(serve_setting("variant"))
@setting_option(serve_setting("threads"))
@json_option
@handle_errors
def generate_command(
    variant_dir, prompt, max_tokens, temperature, top_p, top_k, seed, stop, chat, variant, threads, as_json
) -> None:
    """Complete PROMPT with the text-generation variant at PATH (chosen for this host as `serve` does), without
    a server.

    The text is printed as it is generated; with --json, one document with the text, the token counts
    and the decode speed.

    \b
    Examples:
      lmpack generate dist/smollm2-135m-instruct.q4-1-cpu-x86-int8 "The history of the railway in England began"
      lmpack generate dist/MODEL "What is the capital of France?" --chat --max-tokens 32
      lmpack generate dist/MODEL "Once upon a time" --temperature 0.8 --seed 1 --json
    """
    on_text = None if as_json else (lambda text: click.echo(text, nl=False))
    result = api.generate(
        variant_dir,
        prompt,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=stop,
        chat=chat,
        threads=threads,
        variant=variant,
        on_text=on_text,
    )
    if as_json:
        emit_json(
            {
                "text": result.text,
                "finish_reason": result.finish_reason,
                "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens},
                "prefill_seconds": round(result.prefill_seconds, 4),
                "decode_seconds": round(result.decode_seconds, 4),
                "decode_tokens_per_second": (
                    round(result.decode_tokens_per_second, 2) if result.decode_tokens_per_second else None
                ),
            }
        )
        return
    click.echo()
