"""What a completion's answer holds beyond the generated text: the echoed prompt (`echo`), the logprobs, the tool
calls.

Runs in the request's worker thread (the prompt's logprobs are a model pass of their own), and renders the
parts in OpenAI's shapes for a whole answer or, piece by piece, for a stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lmpack.runtime.engine import DecoderEngine
from lmpack.runtime.generation import Completion, Generation, side_by_side
from lmpack.runtime.logprobs import Renderer, TokenLogprob, prompt_logprobs
from lmpack.runtime.tools import ToolRequest, ToolStream, parse_calls


class Answer:
    def __init__(
        self,
        engine: DecoderEngine,
        generation: Generation,
        *,
        chat: bool,
        echo: bool,
        prompt: str | None,
        tools: ToolRequest | None = None,
    ):
        self.engine, self.generation = engine, generation
        self.chat, self.echo, self.prompt = chat, echo, prompt
        # the calls are read from the answer when the model may make them
        self.tools = tools if tools is not None and tools.offered else None
        self.top = generation.params.logprobs  # None: the request asked for no logprobs
        self.renderer = Renderer(engine.tokenizer)
        self.prompt_entries: list[TokenLogprob | None] = []  # with `echo` and logprobs: run_choices fills it

    def text(self, result: Completion) -> str:
        if not self.echo:
            return result.text
        prompt = self.prompt
        if prompt is None:  # given as token ids
            prompt = self.engine.tokenizer.decode(self.generation.prompt_ids, skip_special_tokens=False)
        return prompt + result.text

    def message(self, result: Completion) -> tuple[str | None, list[dict[str, Any]] | None, str]:
        """A chat answer's content, tool calls (OpenAI's shape) and finish reason."""
        if self.tools is None:
            return result.text, None, result.finish_reason
        content, calls = parse_calls(result.text, self.engine.tool_syntax, self.tools.names)
        if not calls:
            return result.text, None, result.finish_reason
        return content, [call.wire() for call in calls], "tool_calls"

    def tool_stream(self) -> ToolStream | None:
        return ToolStream(self.engine.tool_syntax, self.tools.names) if self.tools is not None else None

    def logprobs(self) -> dict[str, Any] | None:
        """The whole answer's `logprobs` (the prompt's first, with `echo`), or None when not asked for."""
        if self.top is None:
            return None
        chosen = self.generation.decoding.logprobs
        if self.chat:
            return self.renderer.chat(chosen)
        prompt_tokens = list(self.generation.prompt_ids) if self.echo else []
        return self.renderer.completion([*self.prompt_entries, *chosen], prompt_tokens + [e.token for e in chosen])

    def piece(self, entries: Sequence[TokenLogprob]) -> dict[str, Any] | None:
        """A stream chunk's `logprobs`: those of the tokens chosen since the last chunk."""
        if self.top is None:
            return None
        if self.chat:
            return self.renderer.chat(entries)
        return self.renderer.completion(list(entries), [e.token for e in entries])


def share_prefill(engine: DecoderEngine, answers: list[Answer]) -> None:
    """Run the prompt of n choices once; each choice goes on from a copy of its cache (a cancelled request: none)."""
    first = answers[0].generation
    if len(answers) < 2 or first.cancel.is_set():
        return
    cache, logits = first.prefill(engine.runner)
    for answer in answers:
        answer.generation.prefilled = (cache.copy(), logits)


def run_choices(engine: DecoderEngine, answers: list[Answer]) -> list[Completion]:
    """A request's choices (the worker's job): one prefill for all (share_prefill), the prompt's own logprobs once
    (`echo` with logprobs), and the choices decoded side by side (in the server's batch, when it batches)."""
    first = answers[0]
    share_prefill(engine, answers)
    if first.echo and first.top is not None and not first.generation.cancel.is_set():
        entries = prompt_logprobs(engine.runner, first.generation.prompt_ids, first.top)
        for answer in answers:
            answer.prompt_entries = entries
    return side_by_side([answer.generation.result for answer in answers])
