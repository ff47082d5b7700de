"""The OpenAI-compatible HTTP server: routes, readiness, admission, and running generations off the event loop.

Generations run in a pool of worker threads (one per concurrency slot), so the event loop keeps
answering health checks, metrics and 429s while the CPU decodes; with batching on (max_batch > 1) each
worker only relays what the one batcher thread (batcher.py) generates for its request. A streaming
request's worker pushes text deltas to the loop; a client that goes away sets the generation's cancel
event, which the token loop (or the batcher) checks before every step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lmpack.config.serve import ServeSettings
from lmpack.errors import RequestError
from lmpack.runtime.admission import Admission, Overloaded
from lmpack.runtime.auth import bearer_ok
from lmpack.runtime.batcher import Batcher
from lmpack.runtime.cache import CachedAnswer, ResponseCache, cache_key, cacheable, usage_counts
from lmpack.runtime.engine import DecoderEngine, EncoderEngine, load_engine
from lmpack.runtime.http import ObserveRequests, error_response, read_json
from lmpack.runtime.metrics import Metrics
from lmpack.runtime.protocol import (ApiError, check_model, completion_body, embeddings_body, new_id, parse_embeddings,
                                     parse_generation, usage, with_max_tokens)
from lmpack.runtime.sampling import SamplingParams
from lmpack.runtime.streaming import cached_response, live_stream, run_in_worker

log = logging.getLogger("lmpack.serve")

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


_SETTINGS = ServeSettings()  # the operator-facing defaults live in one place: lmpack/config/serve.py


@dataclass(frozen=True)
class ServerConfig:
    """ServeSettings (what an operator sets) plus what only code and tests set: keys, limits, warm-up."""
    variant: str | None = _SETTINGS.variant   # the operator's choice among a bundle's variants (select.py)
    host: str = _SETTINGS.host
    port: int = _SETTINGS.port
    threads: int | None = _SETTINGS.threads    # onnxruntime intra-op threads; None: onnxruntime decides
    max_concurrency: int = _SETTINGS.max_concurrency
    max_batch: int = _SETTINGS.max_batch       # sequences per batched decode step; 1: no batcher
    batch_align: int = _SETTINGS.batch_align   # batcher.EXACT_ALIGN; 1 batches every row together, not exactly
    queue: int = _SETTINGS.queue               # requests waiting for a slot before 429
    api_keys: frozenset[str] = field(default_factory=frozenset)
    max_body_bytes: int = _SETTINGS.max_body_bytes
    default_max_tokens: int = 512              # chat completions without max_tokens (capped by the context)
    max_tokens_limit: int = 4096
    drain_seconds: int = _SETTINGS.drain_seconds
    retry_after_seconds: int = 1
    warmup: bool = True
    tls_cert: Path | None = None               # both or neither: uvicorn's ssl_certfile / ssl_keyfile
    tls_key: Path | None = None
    cache: bool = _SETTINGS.cache              # the response cache for deterministic requests (cache.py)
    cache_max_entries: int = _SETTINGS.cache_max_entries
    cache_max_bytes: int = _SETTINGS.cache_max_bytes
    strict: bool = _SETTINGS.strict            # TensorRT engines: refuse instead of falling back (engines.py)
    engine_rebuild: bool = _SETTINGS.engine_rebuild
    engine_cache_dir: Path | None = _SETTINGS.engine_cache_dir


class ServerState:
    """What the routes share: the engine, the limits, the readiness flags and the worker pool."""

    def __init__(self, engine: DecoderEngine | EncoderEngine, config: ServerConfig):
        self.engine = engine
        self.config = config
        self.model_id = engine.variant.name
        self.created = int(time.time())
        self.admission = Admission(max_active=config.max_concurrency, max_queue=config.queue)
        self.cache = cache = (ResponseCache(max_entries=config.cache_max_entries, max_bytes=config.cache_max_bytes)
                              if config.cache else None)
        self.metrics = Metrics(queue_depth=lambda: self.admission.waiting, active=lambda: self.admission.active,
                               cache=cache)
        self.batcher = None
        # at most max_concurrency sequences are admitted, so a wider batch would never fill; a batch of one
        # gains nothing, so then each generation runs alone in its worker thread, as without batching
        width = min(config.max_batch, config.max_concurrency)
        if isinstance(engine, DecoderEngine) and width > 1:
            self.batcher = engine.batcher = Batcher(engine, max_batch=width, align=config.batch_align,
                                                    on_step=self.metrics.batch_step)
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=config.max_concurrency + 1,
                                                              thread_name_prefix="lmpack-generate")
        self.status = "starting"   # starting -> ready | failed; draining once shutdown begins
        self.status_reason = "the warm-up generation has not finished"

    def authorize(self, request: Request) -> None:
        if not bearer_ok(request.headers.get("authorization"), self.config.api_keys):
            raise ApiError(401, "a valid API key is required: send it as 'Authorization: Bearer KEY'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def require_ready(self) -> None:
        if self.status != "ready":
            raise ApiError(503, f"the server is {self.status}: {self.status_reason}", type="server_error",
                           code=f"server_{self.status}",
                           headers={"Retry-After": str(self.config.retry_after_seconds)})

    async def admit(self):
        try:
            return await self.admission.acquire()
        except Overloaded:
            self.metrics.overloaded()
            raise ApiError(429, f"the server is busy ({self.admission.max_active} running, {self.admission.max_queue}"
                           " queued); retry later", type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": str(self.config.retry_after_seconds)}) from None

    def cached(self, *, chat: bool, prompt: Any, params: SamplingParams) -> tuple[str | None, CachedAnswer | None]:
        """The response-cache key (None when the cache is off or the answer is not fixed) and the stored answer."""
        if self.cache is None or not cacheable(params):
            return None, None
        key = cache_key(model_version=self.engine.variant.digest, chat=chat, prompt=prompt, params=params)
        answer = self.cache.get(key)
        self.metrics.cache_lookup(answer is not None)
        return key, answer

    def warm_up(self) -> None:
        """One tiny generation (or embedding) through the real code path; readiness waits for it."""
        if isinstance(self.engine, EncoderEngine):
            vectors = self.engine.embed(["warm-up"]).vectors
            if not (vectors.shape[0] == 1 and abs(float((vectors ** 2).sum()) - 1.0) < 1e-3):
                raise RuntimeError("the warm-up embedding is not a unit vector")
            return
        ids = self.engine.encode_prompt("Hello")
        result = self.engine.generate(ids, SamplingParams(max_tokens=2, temperature=0)).result()
        if result.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"the warm-up generation ended with {result.finish_reason!r}")


def _state(request: Request) -> ServerState:
    return request.app.state.lmpack


# Routes ----------------------------------------------------------------------------------------------------


async def live(request: Request) -> Response:
    return JSONResponse({"status": "alive"})


async def ready(request: Request) -> Response:
    state = _state(request)
    if state.status == "ready":
        return JSONResponse({"status": "ready", "model": state.model_id})
    return JSONResponse({"status": state.status, "reason": state.status_reason}, status_code=503,
                        headers={"Retry-After": str(state.config.retry_after_seconds)})


async def metrics(request: Request) -> Response:
    state = _state(request)
    state.authorize(request)
    if not state.metrics.enabled:
        raise ApiError(404, "metrics need the prometheus_client package, which is not installed",
                       code="metrics_unavailable")
    content, media_type = state.metrics.render()
    return Response(content, media_type=media_type)


def _model_card(state: ServerState) -> dict[str, Any]:
    return {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "lmpack",
            "task": state.engine.variant.task}


async def list_models(request: Request) -> Response:
    state = _state(request)
    state.authorize(request)
    return JSONResponse({"object": "list", "data": [_model_card(state)]})


async def get_model(request: Request) -> Response:
    state = _state(request)
    state.authorize(request)
    check_model({"model": request.path_params["model"]}, state.model_id)
    return JSONResponse(_model_card(state))


async def completions(request: Request) -> Response:
    return await _generate(request, chat=False)


async def chat_completions(request: Request) -> Response:
    return await _generate(request, chat=True)


async def _generate(request: Request, *, chat: bool) -> Response:
    state = _state(request)
    state.authorize(request)
    state.require_ready()
    engine = state.engine
    if not isinstance(engine, DecoderEngine):
        raise ApiError(400, f"{state.model_id} is an embedding model: use /v1/embeddings", param="model",
                       code="wrong_model_task")
    body = await read_json(request, limit=state.config.max_body_bytes)
    check_model(body, state.model_id)
    req = parse_generation(body, chat=chat, defaults=engine.defaults(), max_tokens_limit=engine.max_tokens_limit)
    prompt_param = "messages" if chat else "prompt"
    loop = asyncio.get_running_loop()
    ids = await loop.run_in_executor(None, engine.encode_chat if chat else engine.encode_prompt,
                                     req.messages if chat else req.prompt)
    max_tokens = req.max_tokens
    if max_tokens is None:  # as many as asked by default, within what the context has room for
        default = state.config.default_max_tokens if chat else COMPLETIONS_DEFAULT_MAX_TOKENS
        max_tokens = max(1, min(default, engine.max_tokens_limit, engine.context_length - len(ids)))
    params = with_max_tokens(req.params, max_tokens)
    key, cached = state.cached(chat=chat, prompt=req.messages if chat else req.prompt, params=params)
    if cached is not None:  # a replay needs no generation slot
        return cached_response(cached, model=state.model_id, chat=chat, stream=req.stream,
                               include_usage=req.include_usage)
    cancel = threading.Event()
    generation = engine.generate(ids, params, cancel=cancel, prompt_param=prompt_param)
    slot = await state.admit()
    if req.stream:
        return live_stream(state, generation, cancel, slot, chat=chat, include_usage=req.include_usage, key=key)
    job = run_in_worker(state, slot, generation.result)
    watcher = asyncio.create_task(_cancel_on_disconnect(request, cancel))
    try:
        result = await asyncio.wrap_future(job)
    finally:
        watcher.cancel()
        if not job.done():
            cancel.set()
    state.metrics.tokens(result.prompt_tokens, result.completion_tokens)
    if key is not None:
        state.cache.put(key, CachedAnswer((result.text,), result.finish_reason, *usage_counts(result)))
    return JSONResponse(completion_body(id=new_id("chatcmpl" if chat else "cmpl"), model=state.model_id, chat=chat,
                                        text=result.text, finish_reason=result.finish_reason,
                                        usage=usage(result.prompt_tokens, result.completion_tokens)))


async def _cancel_on_disconnect(request: Request, cancel: threading.Event) -> None:
    """Wait for the client to hang up (the body is already read, so the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            cancel.set()
            return


async def embeddings(request: Request) -> Response:
    state = _state(request)
    state.authorize(request)
    state.require_ready()
    engine = state.engine
    if not isinstance(engine, EncoderEngine):
        raise ApiError(400, f"{state.model_id} is a text-generation model: it has no embeddings", param="model",
                       code="wrong_model_task")
    body = await read_json(request, limit=state.config.max_body_bytes)
    check_model(body, state.model_id)
    req = parse_embeddings(body)
    slot = await state.admit()
    result = await asyncio.wrap_future(run_in_worker(state, slot, engine.embed, req.inputs))
    state.metrics.tokens(result.prompt_tokens, 0)
    return JSONResponse(embeddings_body(model=state.model_id, vectors=result.vectors,
                                       encoding_format=req.encoding_format, prompt_tokens=result.prompt_tokens))


# The app ---------------------------------------------------------------------------------------------------

ROUTES = [
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", get_model, methods=["GET"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/embeddings", embeddings, methods=["POST"]),
    Route("/health/live", live, methods=["GET"]),
    Route("/health/ready", ready, methods=["GET"]),
    Route("/v2/health/live", live, methods=["GET"]),    # KServe's open inference protocol names
    Route("/v2/health/ready", ready, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]


async def _api_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, RequestError):
        exc = ApiError.from_request_error(exc)
    elif isinstance(exc, HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        exc = ApiError(exc.status_code, str(exc.detail), code=code, headers=exc.headers)
    return error_response(exc)


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path)
    return error_response(ApiError(500, f"internal error: {type(exc).__name__}", type="server_error",
                                   code="internal_error"))


def create_app(engine: DecoderEngine | EncoderEngine, config: ServerConfig = ServerConfig()) -> Starlette:
    """The ASGI app for one engine. It warms up in the background: live at once, ready once warm."""
    state = ServerState(engine, config)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        task = asyncio.create_task(_warm_up(state)) if config.warmup else None
        if task is None:
            state.status = "ready"
        yield
        if task is not None:
            task.cancel()
        state.executor.shutdown(wait=False, cancel_futures=True)
        if state.batcher is not None:
            state.batcher.stop()
            engine.batcher = None

    app = Starlette(routes=ROUTES, lifespan=lifespan,
                    middleware=[Middleware(ObserveRequests, routes={r.path for r in ROUTES},
                                           record=state.metrics.request)],
                    exception_handlers={ApiError: _api_error, RequestError: _api_error, HTTPException: _api_error,
                                        Exception: _server_error})
    app.state.lmpack = state
    return app


async def _warm_up(state: ServerState) -> None:
    try:
        await asyncio.get_running_loop().run_in_executor(state.executor, state.warm_up)
    except Exception as exc:
        log.error("warm-up failed; the server stays not ready: %s", exc)
        state.status, state.status_reason = "failed", f"the warm-up failed: {type(exc).__name__}: {exc}"
        return
    if state.status == "starting":
        state.status, state.status_reason = "ready", ""
        log.info("%s is ready", state.model_id)


def serve(path: Path | str, config: ServerConfig = ServerConfig()) -> None:
    """Pick the variant at `path` (variant, bundle or release) for this host, then answer HTTP until a signal.

    On SIGINT or SIGTERM readiness turns off at once and running requests get `drain_seconds` to finish.
    """
    import uvicorn

    if not logging.getLogger().handlers:  # this is the process's entry point: make the selection's reasons visible
        logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    from lmpack.runtime.select import prepare_variant

    variant = prepare_variant(path, variant=config.variant, strict=config.strict, engine_rebuild=config.engine_rebuild,
                              engine_cache_dir=config.engine_cache_dir)
    engine = load_engine(variant, threads=config.threads, max_tokens_limit=config.max_tokens_limit)
    app = create_app(engine, config)
    state: ServerState = app.state.lmpack

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            state.status, state.status_reason = "draining", "the server is shutting down"
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal once drained, so the process would die of SIGTERM (or show
            # KeyboardInterrupt); a drained stop is a clean one: exit 0.
            getattr(self, "_captured_signals", []).clear()

    tls = {} if config.tls_cert is None else {"ssl_certfile": str(config.tls_cert), "ssl_keyfile": str(config.tls_key)}
    uv_config = uvicorn.Config(app, host=config.host, port=config.port, log_level="info",
                               timeout_graceful_shutdown=config.drain_seconds, server_header=False, **tls)
    DrainingServer(uv_config).run()
