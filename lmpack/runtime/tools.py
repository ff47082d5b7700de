"""Tool calling: OpenAI's `tools` and `tool_choice`, shown to the model through its own chat template, its calls
read back from its output in its family's syntax, and `required` or a named function enforced with a grammar.

A model writes tool calls the way it was tuned to, which its chat template spells out (vLLM's parsers, by name):
- "hermes": `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block per call (Qwen2/2.5/3,
  Hermes, and the many templates that copied them);
- "mistral": `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`;
- "json": the whole answer one JSON object `{"name": ..., "parameters": {...}}` (Llama 3.1-3.3's templates), or
  an array of them; used for any other template that takes `tools`.
With `tool_choice` "required" or a named function, the answer is constrained to that syntax (grammar.py), so it
parses into calls whatever the model would have written; with "auto" the model decides, and an answer that holds
no call in its syntax is plain content.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from lmpack.errors import RequestError
from lmpack.runtime.grammar import JSON_OPTIONS, check_lark

SYNTAXES = ("hermes", "mistral", "json")
CHOICES = ("auto", "none", "required")
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")  # OpenAI's rule for function names
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_MISTRAL = "[TOOL_CALLS]"


@dataclass(frozen=True)
class ToolRequest:
    """A request's tools (OpenAI's objects, checked, as the template takes them) and what it lets the model do."""

    tools: list[dict[str, Any]]
    choice: str  # "auto", "none", "required", or "function" for the named one
    function: str | None = None  # the function a named choice names
    parallel: bool = True  # OpenAI's parallel_tool_calls: false allows one call per answer

    @property
    def offered(self) -> bool:
        """Whether the model is shown the tools and its answer read for calls (not with tool_choice "none")."""
        return self.choice != "none"

    @property
    def names(self) -> list[str]:
        return [tool["function"]["name"] for tool in self.tools]


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI's `arguments`
    id: str

    def wire(self, index: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return body if index is None else {"index": index, **body}


def parse_tools(body: dict[str, Any]) -> ToolRequest | None:
    """`tools` and `tool_choice` checked (RequestError naming the field); None when there are no tools."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise RequestError("tool_choice needs tools", param="tool_choice")
        return None
    if not isinstance(tools, list):
        raise RequestError("tools must be an array of function tools", param="tools", code="invalid_type")
    checked = [_tool(tool, f"tools[{i}]") for i, tool in enumerate(tools)]
    names = [tool["function"]["name"] for tool in checked]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise RequestError(f"two tools are called {repeated[0]!r}", param="tools")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise RequestError(
            "parallel_tool_calls must be true or false", param="parallel_tool_calls", code="invalid_type"
        )
    if choice is None or choice in CHOICES:
        return ToolRequest(checked, choice or "auto", parallel=parallel)
    function = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise RequestError(
            'tool_choice must be "auto", "none", "required" or {"type": "function", "function": {"name": ...}}',
            param="tool_choice",
        )
    if name not in names:
        raise RequestError(f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
    return ToolRequest(checked, "function", name, parallel=parallel)


def _tool(tool: Any, where: str) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise RequestError(f'{where} must be {{"type": "function", "function": {{...}}}}', param=where)
    function = tool["function"]
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise RequestError(
            f"{where}.function.name must be 1-64 letters, digits, _ or -", param=f"{where}.function.name"
        )
    if not isinstance(function.get("description", ""), str):
        raise RequestError(f"{where}.function.description must be a string", param=f"{where}.function.description")
    parameters = function.get("parameters", {"type": "object", "properties": {}})
    where = f"{where}.function.parameters"
    if not isinstance(parameters, dict):
        raise RequestError(f"{where} must be a JSON Schema object", param=where, code="invalid_type")
    check_lark(_schema_lark(parameters), where)  # a schema the grammar engine cannot take is refused here
    return {"type": "function", "function": {**function, "parameters": parameters}}


def syntax_of(template: str) -> str:
    """The tool-call syntax a chat template teaches its model (see the module's docstring)."""
    if "<tool_call>" in template:
        return "hermes"
    if _MISTRAL in template:
        return "mistral"
    return "json"


def _schema_lark(schema: dict[str, Any]) -> str:
    return "start: %json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS})


def tool_grammar(request: ToolRequest, syntax: str) -> str | None:
    """For "required" and a named function: a Lark grammar (llguidance's) whose every sentence is one or more calls
    in `syntax` to the allowed functions with arguments valid for their parameters; None for "auto" and "none"."""
    if request.choice not in ("required", "function"):
        return None
    key = "parameters" if syntax == "json" else "arguments"
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": tool["function"]["name"]}, key: tool["function"]["parameters"]},
            "required": ["name", key],
            "additionalProperties": False,
        }
        for tool in request.tools
        if request.choice == "required" or tool["function"]["name"] == request.function
    ]
    call: dict[str, Any] = calls[0] if len(calls) == 1 else {"anyOf": calls}
    if syntax == "hermes":
        body = json.dumps({**call, "x-guidance": JSON_OPTIONS})
        more = ' ("\\n" call)*' if request.parallel else ""
        return f'start: call{more}\ncall: "<tool_call>\\n" body "\\n</tool_call>"\nbody: %json {body}'
    if syntax == "mistral":
        return _schema_lark(
            {"type": "array", "items": call, "minItems": 1, **({} if request.parallel else {"maxItems": 1})}
        )
    return _schema_lark(call)


def parse_calls(text: str, syntax: str, names: list[str]) -> tuple[str | None, list[ToolCall]]:
    """(the content left, the calls) read from a model's answer; an answer with no call in `syntax` (or one to a
    function not offered) is all content and no calls."""
    if syntax == "hermes":
        found = _HERMES.findall(text)
        calls = [_call(block, "arguments") for block in found]
        content = text[: text.find("<tool_call>")].strip() if found else text
    else:
        stripped = text.strip()
        if syntax == "mistral" and stripped.startswith(_MISTRAL):
            stripped = stripped[len(_MISTRAL) :].strip()
        key = "parameters" if syntax == "json" else "arguments"
        try:
            value = json.loads(stripped)
        except ValueError:
            return text, []
        items = value if isinstance(value, list) else [value]
        calls = [_call(json.dumps(item), key) for item in items]
        content = None
    if not calls or any(call is None or call.name not in names for call in calls):
        return text, []
    return content or None, [call for call in calls if call is not None]


def _call(block: str, key: str) -> ToolCall | None:
    try:
        value = json.loads(block)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get(key, value.get("arguments", value.get("parameters", {})))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string already
        return ToolCall(value["name"], arguments, _new_id())
    return ToolCall(value["name"], json.dumps(arguments, ensure_ascii=False), _new_id())


def _new_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolStream:
    """A streamed answer's text with a tool call's text held back: what may still become a call is not shown until
    it is known not to be one, and the calls are read from the whole answer at its end."""

    def __init__(self, syntax: str, names: list[str]):
        self.syntax, self.names = syntax, names
        self.text = ""
        self.shown = 0  # characters of `text` passed on

    def push(self, delta: str) -> str:
        self.text += delta
        if self.syntax == "hermes":
            start = self.text.find("<tool_call>")
            visible = len(self.text) if start < 0 else start
            # a tail that could be the start of the marker waits for the next delta
            for keep in range(min(len("<tool_call>") - 1, visible), 0, -1):
                if "<tool_call>".startswith(self.text[visible - keep : visible]):
                    visible -= keep
                    break
        else:  # an answer that starts like a call ("{", "[", "[TOOL_CALLS]") is held whole; any other is text
            head = self.text.lstrip()
            visible = 0 if not head or head[0] in "{[" else len(self.text)
        if visible <= self.shown:
            return ""
        out, self.shown = self.text[self.shown : visible], visible
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """What was held back and is content after all, and the calls."""
        content, calls = parse_calls(self.text, self.syntax, self.names)
        if calls:
            return "", calls
        rest, self.shown = self.text[self.shown :], len(self.text)
        return rest, []
