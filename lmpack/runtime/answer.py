"""What a completion's answer holds beyond the generated text: the echoed prompt (`echo`), the logprobs, the tool
calls.

Runs in the request's worker thread (the prompt's logprobs are a model pass of their own), and renders the
parts in OpenAI's shapes for a whole answer or, piece by piece, for a stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lmpack.runtime.engine import DecoderEngine
from lmpack.runtime.generation import Completion, Generation
from lmpack.runtime.logprobs import Renderer, TokenLogprob, prompt_logprobs
from lmpack.runtime.tools import ToolRequest, ToolStream, parse_calls, syntax_of


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
        self.tools = tools if tools is not None and tools.choice != "none" else None
        template = engine.chat_template
        self.syntax = syntax_of(template.source) if template is not None else "json"
        self.top = generation.params.logprobs  # None: the request asked for no logprobs
        self.renderer = Renderer(engine.tokenizer)
        self.prompt_entries: list[TokenLogprob | None] = []
        self.echo_done = False  # the prompt's logprobs are in prompt_entries already (shared by n choices)

    def run(self) -> Completion:
        """Generate (after the prompt's own logprobs, for `echo` with logprobs); the worker's job."""
        if self.echo and self.top is not None and not self.echo_done and not self.generation.cancel.is_set():
            self.prompt_entries = prompt_logprobs(self.engine.runner, self.generation.prompt_ids, self.top)
        return self.generation.result()

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
        content, calls = parse_calls(result.text, self.syntax, self.tools.names)
        if not calls:
            return result.text, None, result.finish_reason
        return content, [call.wire() for call in calls], "tool_calls"

    def tool_stream(self) -> ToolStream | None:
        return ToolStream(self.syntax, self.tools.names) if self.tools is not None else None

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
    """n choices of one prompt (the worker's job): one prefill (share_prefill), and the choices decode side by side
    (in the server's batch, when it batches)."""
    import threading

    first = answers[0].generation
    share_prefill(engine, answers)
    if first.params.logprobs is not None and answers[0].echo and not first.cancel.is_set():
        entries = prompt_logprobs(engine.runner, first.prompt_ids, first.params.logprobs)
        for answer in answers:
            answer.prompt_entries, answer.echo_done = entries, True
    results: list[Completion | None] = [None] * len(answers)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            results[index] = answers[index].run()
        except BaseException as exc:  # re-raised below, in the worker, as a single choice's failure would be
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), name=f"lmpack-choice-{i}") for i in range(len(answers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return [result for result in results if result is not None]
