"""Streamed completions (server-sent events) and cached answers, shared by live generations and replays.

One writer for the event sequence (role chunk, text chunks, finish chunk, optional usage chunk, [DONE]),
so a replayed answer is framed exactly like the generation it was recorded from. A live stream needs of
the server only what StreamHooks names: a worker to run in, and where its counts and its answer go.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse, Response

from lmpack.runtime.cache import CachedAnswer, usage_counts
from lmpack.runtime.generation import Generation, side_by_side
from lmpack.runtime.http import GuardedStream, sse
from lmpack.runtime.logprobs import TokenLogprob
from lmpack.runtime.protocol import ApiError, choice_body, chunk_body, completion_body, new_id, usage
from lmpack.runtime.tools import ToolStream

log = logging.getLogger("lmpack.serve")

# Items a source yields: ("text", (choice, delta, logprobs or None)), ("tools", (choice, [tool call deltas])),
# ("finish", (choice, finish_reason)), ("error", exception), ("end", (prompt tokens, completion tokens)).
Item = tuple[str, Any]


async def sse_events(
    items: AsyncIterator[Item],
    *,
    ident: str,
    model: str,
    chat: bool,
    include_usage: bool,
    choices: int = 1,
    on_first_text: Callable[[], None] | None = None,
) -> AsyncIterator[str]:
    if chat:
        for index in range(choices):
            yield sse(chunk_body(id=ident, model=model, chat=True, index=index, role=True))
    first = True
    async for kind, value in items:
        if kind == "text":
            if first and on_first_text is not None:
                on_first_text()
            first = False
            index, text, logprobs = value
            yield sse(chunk_body(id=ident, model=model, chat=chat, index=index, text=text, logprobs=logprobs))
        elif kind == "tools":
            index, calls = value
            for call in calls:
                yield sse(chunk_body(id=ident, model=model, chat=chat, index=index, tool_calls=[call]))
        elif kind == "finish":
            index, finish_reason = value
            yield sse(chunk_body(id=ident, model=model, chat=chat, index=index, finish_reason=finish_reason))
        elif kind == "error":
            yield sse(
                ApiError(
                    500, f"generation failed: {type(value).__name__}", type="server_error", code="generation_failed"
                ).body()
            )
            break
        else:
            prompt_tokens, completion_tokens = value
            if include_usage:
                yield sse(chunk_body(id=ident, model=model, chat=chat, usage=usage(prompt_tokens, completion_tokens)))
            break
    yield sse("[DONE]")


async def queue_items(queue: asyncio.Queue[Item]) -> AsyncIterator[Item]:
    """Items a worker thread pushes onto `queue`, until the end or an error."""
    while True:
        item = await queue.get()
        yield item
        if item[0] in ("end", "error"):
            return


async def replay_items(answer: CachedAnswer) -> AsyncIterator[Item]:
    """A cached answer as the items its generation produced: the same pieces, the same finish."""
    for chunk in answer.chunks:
        yield "text", (0, chunk, None)
    yield "finish", (0, answer.finish_reason)
    yield "end", (answer.prompt_tokens, answer.completion_tokens)


def cached_response(answer: CachedAnswer, *, model: str, chat: bool, stream: bool, include_usage: bool) -> Response:
    """A cached answer in the shape the request asked for: a JSON body, or the recorded stream replayed."""
    ident = new_id("chatcmpl" if chat else "cmpl")
    if stream:
        return GuardedStream(
            sse_events(replay_items(answer), ident=ident, model=model, chat=chat, include_usage=include_usage),
            on_close=lambda: None,
        )
    return JSONResponse(
        completion_body(
            id=ident,
            model=model,
            chat=chat,
            choices=[choice_body(chat=chat, text=answer.text, finish_reason=answer.finish_reason)],
            usage=usage(answer.prompt_tokens, answer.completion_tokens),
        )
    )


@dataclass(frozen=True)
class StreamHooks:
    """What a live stream needs of the server."""

    submit: Callable[[Callable[[], None]], concurrent.futures.Future]  # run in a worker that holds the request's slot
    on_first_text: Callable[[float], None]  # seconds from the request's admission to its first text
    on_end: Callable[[Generation], None]  # the generation, however the stream ended (the metrics)
    on_answer: Callable[[CachedAnswer], object] | None = None  # the whole answer of a finished generation (the cache)


@dataclass(frozen=True)
class StreamedChoice:
    """One choice of a streamed answer: its generation and how its pieces beyond text are written."""

    generation: Generation
    # renders a chunk's logprobs from the tokens chosen since the chunk before (the batcher may have chosen a
    # token whose text the decoder still holds back, so a chunk can carry a token its text has not shown)
    logprobs: Callable[[list[TokenLogprob]], dict | None] = lambda entries: None
    tool_stream: ToolStream | None = None  # holds back what may be a tool call; the calls come at the end


def live_stream(
    choices: list[StreamedChoice],
    cancel: threading.Event,
    hooks: StreamHooks,
    *,
    model: str,
    chat: bool,
    include_usage: bool,
    prepare: Callable[[], None] = lambda: None,
) -> Response:
    """Generations streamed as they run: a worker pushes their deltas onto the loop; a client that leaves cancels
    them. Several choices (n > 1) decode side by side (generation.side_by_side) after `prepare` (their shared
    prefill), and their chunks interleave, told apart by `index`. With a choice's tool_stream, its calls come as one
    `tool_calls` delta each, before its finish chunk (finish_reason "tool_calls")."""
    started, loop = time.perf_counter(), asyncio.get_running_loop()
    queue: asyncio.Queue[Item] = asyncio.Queue()

    def push(item: Item) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is gone: nobody to tell
            pass

    def run(index: int) -> None:
        choice = choices[index]
        generation, tool_stream, pieces = choice.generation, choice.tool_stream, []
        chosen, sent = generation.decoding.logprobs, 0
        try:
            for delta in generation:
                pieces.append(delta)
                count = len(chosen)
                shown = tool_stream.push(delta) if tool_stream is not None else delta
                push(("text", (index, shown, choice.logprobs(chosen[sent:count]))))
                sent = count
            rest, calls = tool_stream.finish() if tool_stream is not None else ("", [])
            if rest or sent < len(chosen):  # held-back text, tokens whose text had none (a stop sequence's)
                push(("text", (index, rest, choice.logprobs(chosen[sent:]))))
            if calls:
                push(("tools", (index, [call.wire(i) for i, call in enumerate(calls)])))
            push(("finish", (index, "tool_calls" if calls else generation.finish_reason)))
            if hooks.on_answer is not None and len(choices) == 1:  # the cache refuses a cancelled generation
                hooks.on_answer(CachedAnswer(tuple(pieces), generation.finish_reason or "", *usage_counts(generation)))
        finally:  # counted here so cancelled streams count what they did generate
            hooks.on_end(generation)

    def work() -> None:
        try:
            prepare()
            side_by_side([functools.partial(run, index) for index in range(len(choices))])
            prompt_tokens = choices[0].generation.prompt_tokens
            push(("end", (prompt_tokens, sum(choice.generation.completion_tokens for choice in choices))))
        except Exception as exc:  # an engine failure mid-stream: the client gets an error event
            log.exception("generation failed")
            push(("error", exc))

    hooks.submit(work)
    events = sse_events(
        queue_items(queue),
        ident=new_id("chatcmpl" if chat else "cmpl"),
        model=model,
        chat=chat,
        include_usage=include_usage,
        choices=len(choices),
        on_first_text=lambda: hooks.on_first_text(time.perf_counter() - started),
    )
    return GuardedStream(events, on_close=cancel.set)
