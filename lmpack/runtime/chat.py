"""Render a model's own chat template safely: the template ships with the model, so it runs sandboxed.

Jinja's ImmutableSandboxedEnvironment blocks attribute access to Python internals and mutation of
the objects passed in, which is what transformers' `apply_chat_template` uses too; the options and the
helpers (`raise_exception`, `strftime_now`, `tojson`) follow transformers so templates render the same.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from lmpack.errors import RequestError, VariantError

ROLES = ("system", "developer", "user", "assistant", "tool")


def _raise_exception(message: str):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatTemplate:
    """One compiled template; `render` turns OpenAI-style messages into the prompt text the model was tuned on."""

    def __init__(self, source: str, *, bos_token: str | None = None, eos_token: str | None = None):
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = _tojson
        try:
            self.template = env.from_string(source)
        except TemplateError as exc:
            raise VariantError(f"the model's chat template does not compile: {exc}") from exc
        self.special = {"bos_token": bos_token or "", "eos_token": eos_token or ""}

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True) -> str:
        from jinja2 import TemplateError

        try:
            return self.template.render(
                messages=normalize_messages(messages),
                add_generation_prompt=add_generation_prompt,
                tools=None,
                documents=None,
                **self.special,
            )
        except TemplateError as exc:
            raise RequestError(f"the model's chat template rejected the messages: {exc}", param="messages") from exc


def normalize_messages(messages: Any) -> list[dict[str, str]]:
    """Check the shape of `messages` and flatten content parts to text; RequestError names the bad field."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty array of {role, content} objects", param="messages")
    out = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object with role and content", param=where)
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", param=f"{where}.role")
        out.append({"role": role, "content": _text(message.get("content"), f"{where}.content")})
    return out


def _text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(
                    f'{where}[{i}] must be a text part {{"type": "text", "text": ...}}: this model reads text only',
                    param=where,
                )
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(f"{where} must be a string or an array of text parts", param=where)
