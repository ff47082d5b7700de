"""What a completion's answer holds beyond the generated text: the echoed prompt (`echo`) and the logprobs.

Runs in the request's worker thread (the prompt's logprobs are a model pass of their own), and renders the
parts in OpenAI's shapes for a whole answer or, piece by piece, for a stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lmpack.runtime.engine import DecoderEngine
from lmpack.runtime.generation import Completion, Generation
from lmpack.runtime.logprobs import Renderer, TokenLogprob, prompt_logprobs


class Answer:
    def __init__(self, engine: DecoderEngine, generation: Generation, *, chat: bool, echo: bool, prompt: str | None):
        self.engine, self.generation = engine, generation
        self.chat, self.echo, self.prompt = chat, echo, prompt
        self.top = generation.params.logprobs  # None: the request asked for no logprobs
        self.renderer = Renderer(engine.tokenizer)
        self.prompt_entries: list[TokenLogprob | None] = []

    def run(self) -> Completion:
        """Generate (after the prompt's own logprobs, for `echo` with logprobs); the worker's job."""
        if self.echo and self.top is not None and not self.generation.cancel.is_set():
            self.prompt_entries = prompt_logprobs(self.engine.runner, self.generation.prompt_ids, self.top)
        return self.generation.result()

    def text(self, result: Completion) -> str:
        if not self.echo:
            return result.text
        prompt = self.prompt
        if prompt is None:  # given as token ids
            prompt = self.engine.tokenizer.decode(self.generation.prompt_ids, skip_special_tokens=False)
        return prompt + result.text

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
