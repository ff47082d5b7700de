"""/v1/completions and /v1/chat/completions: a request read, its prompt tokenized, its generation run in a worker
(or streamed), its answer written with what it asked for beyond text (logprobs, echo, tool calls)."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import threading
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lmpack.runtime.answer import Answer, run_choices, share_prefill
from lmpack.runtime.cache import CachedAnswer, usage_counts
from lmpack.runtime.grammar import check_lark
from lmpack.runtime.protocol import ApiError, choice_body, completion_body, new_id, parse_generation, usage
from lmpack.runtime.sampling import SamplingParams
from lmpack.runtime.streaming import StreamedChoice, cached_response, live_stream
from lmpack.runtime.tools import tool_grammar

if TYPE_CHECKING:
    from lmpack.runtime.server import ServerState


def _state(request: Request) -> ServerState:
    return request.app.state.lmpack


async def completions(request: Request) -> Response:
    return await _generate(request, chat=False)


async def chat_completions(request: Request) -> Response:
    return await _generate(request, chat=True)


async def _generate(request: Request, *, chat: bool) -> Response:
    state = _state(request)
    engine, body = await state.decoder_request(request)
    req = parse_generation(body, chat=chat, defaults=engine.defaults(), max_tokens_limit=engine.max_tokens_limit)
    prompt_param = "messages" if chat else "prompt"
    loop = asyncio.get_running_loop()
    shown_tools = req.tools.tools if req.tools is not None and req.tools.offered else None
    if chat:
        assert req.messages is not None  # parse_generation: a chat request has its messages
        ids = await loop.run_in_executor(None, engine.encode_chat, req.messages, shown_tools)
    elif req.prompt_ids is not None:
        ids = engine.check_token_ids(req.prompt_ids, "prompt")
    else:
        assert req.prompt is not None  # parse_generation: a completion request has its prompt
        ids = await loop.run_in_executor(
            None, functools.partial(engine.encode_prompt, req.prompt, parse_special=req.parse_special)
        )
    params = req.params(state.max_tokens(req.max_tokens, chat=chat, prompt_tokens=len(ids)))
    if req.tools is not None and engine.chat_template is not None:  # required or named: the answer is calls
        lark = tool_grammar(req.tools, engine.tool_syntax)
        if lark is not None:
            params = dataclasses.replace(params, grammar=check_lark(lark, "tool_choice"))
    # a prompt's control tokens read as text or as tokens are two prompts (parse_special_tokens)
    prompt_key = req.messages if chat else [req.prompt, req.parse_special, req.prompt_ids]
    # a replay is one choice's text alone: no prompt, no calls read
    replayable = not req.echo and req.tools is None and req.n == 1
    key, cached = state.cached(chat=chat, prompt=prompt_key, params=params) if replayable else (None, None)
    if cached is not None:  # a replay needs no generation slot
        return cached_response(
            cached, model=state.model_id, chat=chat, stream=req.stream, include_usage=req.include_usage
        )
    if req.n > state.settings.max_batch:
        raise ApiError(400, f"n may be at most the batch size, {state.settings.max_batch}", param="n")
    cancel = threading.Event()
    generations = [
        engine.generate(
            ids,
            _choice_params(params, i),
            cancel=cancel,
            prompt_param=prompt_param,
            loop=state.loop,
            prefix_cache=state.prefix_cache,
        )
        for i in range(req.n)
    ]
    slot = await state.admit()
    answers = [
        Answer(engine, generation, chat=chat, echo=req.echo, prompt=req.prompt, tools=req.tools)
        for generation in generations
    ]
    if req.stream:
        return live_stream(
            [StreamedChoice(a.generation, a.piece, a.tool_stream()) for a in answers],
            cancel,
            state.stream_hooks(slot, key),
            model=state.model_id,
            chat=chat,
            include_usage=req.include_usage,
            prepare=lambda: share_prefill(engine, answers),
        )
    job = state.run_in_worker(slot, run_choices, engine, answers)
    watcher = asyncio.create_task(_cancel_on_disconnect(request, cancel))
    try:
        results = await asyncio.wrap_future(job)
    finally:
        watcher.cancel()
        if not job.done():
            cancel.set()
    for generation in generations:
        state.record(generation)
    if key is not None and state.cache is not None:  # replayable: one choice
        state.cache.put(key, CachedAnswer((results[0].text,), results[0].finish_reason, *usage_counts(results[0])))
    choices = []
    for index, (answer, result) in enumerate(zip(answers, results, strict=True)):
        text, tool_calls, finish_reason = (
            answer.message(result) if chat else (answer.text(result), None, result.finish_reason)
        )
        choices.append(
            choice_body(
                index=index,
                chat=chat,
                text=text,
                finish_reason=finish_reason,
                logprobs=answer.logprobs(),
                tool_calls=tool_calls,
            )
        )
    completion_tokens = sum(result.completion_tokens for result in results)
    return JSONResponse(
        completion_body(
            id=new_id("chatcmpl" if chat else "cmpl"),
            model=state.model_id,
            chat=chat,
            choices=choices,
            usage=usage(results[0].prompt_tokens, completion_tokens),
        )
    )


def _choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Choice `index`'s sampling: a request's seed gives each choice its own (seed + index), so they differ and each
    is reproducible."""
    if index == 0 or params.seed is None:
        return params
    return dataclasses.replace(params, seed=params.seed + index)


async def _cancel_on_disconnect(request: Request, cancel: threading.Event) -> None:
    """Wait for the client to hang up (the body is already read, so the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            cancel.set()
            return
