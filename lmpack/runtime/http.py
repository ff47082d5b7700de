"""HTTP plumbing shared by the routes: capped JSON bodies, OpenAI-shaped errors, server-sent events, metrics.

Kept apart from server.py so the routes read as what they do; nothing here knows about models.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmpack.runtime.protocol import ApiError

JSON_TYPES = ("application/json",)
MAX_JSON_DEPTH = 64  # far deeper than any request of the API (a tool's JSON schema included) needs


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def read_json(request: Request, *, limit: int) -> dict[str, Any]:
    """The request body as a JSON object: 415 unless JSON and uncompressed, 413 above `limit` bytes, 400 if invalid.

    Compressed bodies are refused rather than inflated, so the cap always bounds what is held in memory.
    """
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type not in JSON_TYPES:
        raise ApiError(
            415,
            f"the body must be application/json, got {media_type or 'no content type'}",
            code="unsupported_media_type",
        )
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise ApiError(415, f"compressed bodies ({encoding}) are not accepted", code="unsupported_media_type")
    too_large = ApiError(413, f"the body is larger than the limit of {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    # parsed in a worker thread: a large body must not hold up the loop (liveness answers meanwhile)
    return await asyncio.get_running_loop().run_in_executor(None, parse_json_body, b"".join(chunks))


def parse_json_body(data: bytes) -> dict[str, Any]:
    """A request body as a JSON object, or a 400: not JSON, not an object, nested deeper than MAX_JSON_DEPTH (the
    parser's own recursion limit is a RecursionError, a 500 before), or a string that is not Unicode text (a lone
    surrogate such as "\\ud800", which the tokenizer cannot take): the error names the field."""
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from exc
    except RecursionError:
        raise ApiError(400, f"the body is nested deeper than {MAX_JSON_DEPTH} levels", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    _check_values(body)
    return body


def _check_values(body: dict[str, Any]) -> None:
    """Walk the parsed body without recursion: bounded depth, and only well-formed Unicode strings."""
    stack: list[tuple[Any, str, int]] = [(body, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"the body is nested deeper than {MAX_JSON_DEPTH} levels", code="invalid_json")
        if isinstance(value, str):
            if not _is_text(value):
                raise ApiError(
                    400,
                    f"{path or 'a string'} holds a lone surrogate (\\ud800-\\udfff): not Unicode text",
                    param=path or None,
                    code="invalid_value",
                )
        elif isinstance(value, dict):
            for key, item in value.items():
                child = f"{path}.{key}" if path else str(key)
                if not _is_text(key):
                    raise ApiError(
                        400, "a key holds a lone surrogate: not Unicode text", param=path or None, code="invalid_value"
                    )
                stack.append((item, child, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{index}]", depth + 1) for index, item in enumerate(value))


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


class GuardedStream(StreamingResponse):
    """A streaming response that always runs `on_close`, however it ends: finished, client gone, or never started.

    An async generator's `finally` does not run if it was never iterated, so cleanup that must happen
    (stopping the generation) hangs on the response instead.
    """

    def __init__(self, content: AsyncIterator[str], *, on_close: Callable[[], None]):
        super().__init__(
            content, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


class ObserveRequests:
    """ASGI middleware: count each response by route and status code and time it to its last byte.

    Routes outside `routes` are counted as "other", so scanning clients cannot grow the label set.
    """

    def __init__(self, app: ASGIApp, *, routes: set[str], record: Callable[[str, int, float], None]):
        self.app = app
        self.routes = routes
        self.record = record

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in self.routes else "other"
        started = time.perf_counter()
        status = 500
        recorded = False

        async def observed_send(message: Message) -> None:
            nonlocal status, recorded
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body") and not recorded:
                recorded = True
                self.record(route, status, time.perf_counter() - started)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            if not recorded:  # the client left mid-response, or the app failed before answering
                self.record(route, status, time.perf_counter() - started)
