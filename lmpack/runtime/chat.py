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
_PAD = " \n"  # around a content marker: a template that trims content removes it


def _marker(index: int) -> str:
    """Stands in for message `index`'s content (private-use characters no tokenizer or template gives meaning)."""
    return f"\ue000{index}\ue001"


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
        from jinja2 import TemplateError, meta
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
        # Hugging Face templates that can show tools to the model read a `tools` variable (tools.py: the syntax)
        self.supports_tools = "tools" in meta.find_undeclared_variables(env.parse(source))

    def render(
        self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True, tools: list | None = None
    ) -> str:
        from jinja2 import TemplateError

        try:
            return self.template.render(
                messages=normalize_messages(messages),
                add_generation_prompt=add_generation_prompt,
                tools=tools or None,
                documents=None,
                **self.special,
            )
        except TemplateError as exc:
            raise RequestError(f"the model's chat template rejected the messages: {exc}", param="messages") from exc

    def segments(self, messages: list[dict[str, Any]], tools: list | None = None) -> list[tuple[str, bool]] | None:
        """The rendered prompt as (text, from_content) pieces: the template's own markup, and each message's
        content as the template placed it, so the caller can tokenize content as plain text (a user who writes
        "<|im_end|>" must not end their turn). None when the pieces cannot be told apart (the template changes
        the content in a way other than trimming it); the caller then refuses control tokens in content.

        How: render once with each content replaced by a marker wrapped in whitespace. The marker shows where
        the content goes, and whether the padding survived shows whether the template trims content."""
        normalized = normalize_messages(messages)
        real = self.render(normalized, tools=tools)
        marked = self.render(
            [{**m, "content": _PAD + _marker(i) + _PAD} for i, m in enumerate(normalized)], tools=tools
        )
        pieces: list[tuple[str, bool]] = []
        rest = marked
        for index, message in enumerate(normalized):
            marker = _marker(index)
            at = rest.find(marker)
            if at < 0:
                continue  # the template left this message out (or changed it beyond recognition: checked below)
            before, after = rest[:at], rest[at + len(marker) :]
            content = message["content"]
            content = content if before.endswith(_PAD) else content.lstrip()
            content = content if after.startswith(_PAD) else content.rstrip()
            pieces.append((before.removesuffix(_PAD), False))
            pieces.append((content, True))
            rest = after.removeprefix(_PAD)
        pieces.append((rest, False))
        if "".join(text for text, _ in pieces) != real:
            return None
        return [(text, from_content) for text, from_content in pieces if text]


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Check the shape of `messages` and flatten content parts to text; RequestError names the bad field. An
    assistant's `tool_calls` (arguments as objects, which templates write with `tojson`) and a tool message's
    `tool_call_id` and `name` are kept for the template."""
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
        normalized: dict[str, Any] = {"role": role, "content": _text(message.get("content"), f"{where}.content")}
        if role == "assistant" and message.get("tool_calls"):
            normalized["tool_calls"] = _tool_calls(message["tool_calls"], f"{where}.tool_calls")
        for key in ("tool_call_id", "name"):
            if isinstance(message.get(key), str):
                normalized[key] = message[key]
        out.append(normalized)
    return out


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise RequestError(f"{where} must be an array of tool calls", param=where)
    out = []
    for i, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RequestError(
                f'{where}[{i}] must be {{"type": "function", "function": {{name, arguments}}}}', param=where
            )
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except ValueError:
                raise RequestError(
                    f"{where}[{i}].function.arguments is not JSON", param=f"{where}[{i}].function.arguments"
                ) from None
        out.append(
            {
                "id": call.get("id", ""),
                "type": "function",
                "function": {"name": function["name"], "arguments": arguments},
            }
        )
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
