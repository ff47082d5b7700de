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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lmpack import __version__
from lmpack.config.serve import ServeSettings
from lmpack.errors import ConfigError, RequestError
from lmpack.runtime import openapi, token_api
from lmpack.runtime.admission import Admission, Overloaded, Slot
from lmpack.runtime.auth import bearer_ok
from lmpack.runtime.batcher import Batcher
from lmpack.runtime.cache import CachedAnswer, ResponseCache, cache_key, cacheable
from lmpack.runtime.engine import DecoderEngine, EncoderEngine, load_engine
from lmpack.runtime.generate_route import chat_completions, completions
from lmpack.runtime.generation import Generation, GenerationLoop
from lmpack.runtime.http import ObserveRequests, error_response, read_json
from lmpack.runtime.metrics import Metrics
from lmpack.runtime.prefix_cache import PrefixCache
from lmpack.runtime.protocol import (
    ApiError,
    check_model,
    embeddings_body,
    parse_embeddings,
)
from lmpack.runtime.sampling import COMPLETIONS_DEFAULT_MAX_TOKENS, SamplingParams, resolve_max_tokens
from lmpack.runtime.streaming import StreamHooks
from lmpack.runtime.variant import Variant

log = logging.getLogger("lmpack.serve")

RETRY_AFTER_SECONDS = 1  # what 429s and 503s ask a client to wait


class ServerState:
    """What the routes share: the engine and its generation loop, the limits, the readiness flags, the workers."""

    def __init__(
        self, engine: DecoderEngine | EncoderEngine, settings: ServeSettings, *, api_keys: frozenset[str] = frozenset()
    ):
        self.engine = engine
        self.settings = settings
        self.api_keys = api_keys
        self.model_names = engine.variant.served_names(settings.served_model_name)
        self.model_id = self.model_names[0]  # what answers call the model
        self.created = int(time.time())
        self.admission = Admission(max_active=settings.max_concurrency, max_queue=settings.queue)
        self.cache = cache = (
            ResponseCache(max_entries=settings.cache_max_entries, max_bytes=settings.cache_max_bytes)
            if settings.cache
            else None
        )
        self.prefix_cache = (
            PrefixCache(max_bytes=settings.prefix_cache_bytes)
            if settings.prefix_cache_bytes and isinstance(engine, DecoderEngine)
            else None
        )
        self.metrics = Metrics(
            queue_depth=lambda: self.admission.waiting,
            active=lambda: self.admission.active,
            cache=cache,
            model_name=self.model_id,
            kv_usage=lambda: self.admission.active / self.admission.max_active,
            prefix_cache=self.prefix_cache,
        )
        self.loop = self._generation_loop(engine, settings)
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=settings.max_concurrency + 1, thread_name_prefix="lmpack-generate"
        )
        self.status = "starting"  # starting -> ready | failed; draining once shutdown begins
        self.status_reason = "the warm-up generation has not finished"

    def _generation_loop(self, engine: DecoderEngine | EncoderEngine, settings: ServeSettings) -> GenerationLoop | None:
        """The batcher, or each generation alone in its worker thread: at most max_concurrency sequences are
        admitted, so a wider batch would never fill, and a batch of one gains nothing."""
        if not isinstance(engine, DecoderEngine):
            return None
        width = min(settings.max_batch, settings.max_concurrency)
        if width > 1:
            return Batcher(
                engine.runner,
                max_batch=width,
                align=settings.batch_align,
                on_step=self.metrics.batch_step,
                prefill_chunk=settings.prefill_chunk,
            )
        return engine.solo

    def authorize(self, request: Request) -> None:
        if not bearer_ok(request.headers.get("authorization"), self.api_keys):
            raise ApiError(
                401,
                "a valid API key is required: send it as 'Authorization: Bearer KEY'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def require_ready(self) -> None:
        if self.status != "ready":
            raise ApiError(
                503,
                f"the server is {self.status}: {self.status_reason}",
                type="server_error",
                code=f"server_{self.status}",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )

    def decoder(self) -> DecoderEngine:
        """The engine, for the routes of text-generation models; an embedding model gets a 400 naming the model."""
        if not isinstance(self.engine, DecoderEngine):
            raise ApiError(
                400,
                f"{self.model_id} is an embedding model: use /v1/embeddings",
                param="model",
                code="wrong_model_task",
            )
        return self.engine

    async def decoder_request(self, request: Request) -> tuple[DecoderEngine, dict[str, Any]]:
        """What every text-generation route does first: the key, readiness, the model's task, the body, its model."""
        self.authorize(request)
        self.require_ready()
        engine = self.decoder()
        body = await read_json(request, limit=self.settings.max_body_bytes)
        check_model(body, self.model_names)
        return engine, body

    async def admit(self) -> Slot:
        try:
            return await self.admission.acquire()
        except Overloaded:
            self.metrics.overloaded()
            raise ApiError(
                429,
                f"the server is busy ({self.admission.max_active} running, {self.admission.max_queue}"
                " queued); retry later",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            ) from None

    def run_in_worker(self, slot: Slot, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        """Run `fn` in the worker pool; the slot frees when the thread is done, not when the client leaves."""
        try:
            job = self.executor.submit(fn, *args)
        except BaseException:
            slot.release()
            raise
        job.add_done_callback(lambda _: slot.release())
        return job

    def stream_hooks(self, slot: Slot, key: str | None) -> StreamHooks:
        cache = self.cache
        return StreamHooks(
            submit=lambda work: self.run_in_worker(slot, work),
            on_first_text=self.metrics.time_to_first_token,
            on_end=self.record,
            on_answer=(lambda answer: cache.put(key, answer)) if cache is not None and key else None,
        )

    def record(self, generation: Generation) -> None:
        """A generation's end in the metrics, however it ended."""
        decoding, created = generation.decoding, generation.created
        self.metrics.generation(
            reason=generation.finish_reason,
            prompt_tokens=generation.prompt_tokens,
            completion_tokens=generation.completion_tokens,
            first_token_seconds=None if decoding.first_token_at is None else decoding.first_token_at - created,
            token_gaps=decoding.token_gaps,
            seconds=time.perf_counter() - created,
        )

    def max_tokens(self, requested: int | None, *, chat: bool, prompt_tokens: int) -> int:
        engine = self.engine
        assert isinstance(engine, DecoderEngine)
        return resolve_max_tokens(
            requested,
            prompt_tokens=prompt_tokens,
            context_length=engine.context_length,
            limit=engine.max_tokens_limit,
            default=self.settings.default_max_tokens if chat else COMPLETIONS_DEFAULT_MAX_TOKENS,
        )

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
            if not (vectors.shape[0] == 1 and abs(float((vectors**2).sum()) - 1.0) < 1e-3):
                raise RuntimeError("the warm-up embedding is not a unit vector")
            return
        ids = self.engine.encode_prompt("Hello")
        result = self.engine.generate(ids, SamplingParams(max_tokens=2, temperature=0), loop=self.loop).result()
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
    return JSONResponse(
        {"status": state.status, "reason": state.status_reason},
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


async def metrics(request: Request) -> Response:
    state = _state(request)
    state.authorize(request)
    if not state.metrics.enabled:
        raise ApiError(
            404, "metrics need the prometheus_client package, which is not installed", code="metrics_unavailable"
        )
    content, media_type = state.metrics.render()
    return Response(content, media_type=media_type)


def _model_card(state: ServerState, name: str) -> dict[str, Any]:
    engine = state.engine
    return {
        "id": name,
        "object": "model",
        "created": state.created,
        "owned_by": "lmpack",
        "root": engine.variant.name,  # the variant behind every name
        "task": engine.variant.task,
        # vLLM's name for the context length; for an embedding model, the longest input it reads
        "max_model_len": engine.context_length if isinstance(engine, DecoderEngine) else engine.max_input_tokens,
        **({"sampling_defaults": engine.defaults()} if isinstance(engine, DecoderEngine) else {}),
    }


async def openapi_document(request: Request) -> Response:
    """Open, as the health probes are: it describes the API, and holds nothing of the model's."""
    return JSONResponse(openapi.document(__version__))


async def list_models(request: Request) -> Response:
    state = _state(request)
    state.authorize(request)
    return JSONResponse({"object": "list", "data": [_model_card(state, name) for name in state.model_names]})


async def get_model(request: Request) -> Response:
    state = _state(request)
    state.authorize(request)
    name = request.path_params["model"]
    check_model({"model": name}, state.model_names)
    return JSONResponse(_model_card(state, name))


async def embeddings(request: Request) -> Response:
    state = _state(request)
    state.authorize(request)
    state.require_ready()
    engine = state.engine
    if not isinstance(engine, EncoderEngine):
        raise ApiError(
            400,
            f"{state.model_id} is a text-generation model: it has no embeddings",
            param="model",
            code="wrong_model_task",
        )
    body = await read_json(request, limit=state.settings.max_body_bytes)
    check_model(body, state.model_names)
    req = parse_embeddings(body)
    slot = await state.admit()
    result = await asyncio.wrap_future(state.run_in_worker(slot, engine.embed, req.inputs))
    state.metrics.embedded(result.prompt_tokens)
    return JSONResponse(
        embeddings_body(
            model=state.model_id,
            vectors=result.vectors,
            encoding_format=req.encoding_format,
            prompt_tokens=result.prompt_tokens,
        )
    )


async def tokenize(request: Request) -> Response:
    return await _token_route(request, token_api.tokenize)


async def detokenize(request: Request) -> Response:
    return await _token_route(request, token_api.detokenize)


async def _token_route(request: Request, answer: Callable[[DecoderEngine, dict], dict]) -> Response:
    state = _state(request)
    engine, body = await state.decoder_request(request)
    result = await asyncio.get_running_loop().run_in_executor(None, answer, engine, body)
    return JSONResponse(result)


# The app ---------------------------------------------------------------------------------------------------

ROUTES = [
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", get_model, methods=["GET"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/embeddings", embeddings, methods=["POST"]),
    Route("/tokenize", tokenize, methods=["POST"]),  # vLLM's and llama.cpp's paths
    Route("/detokenize", detokenize, methods=["POST"]),
    Route("/health/live", live, methods=["GET"]),
    Route("/health/ready", ready, methods=["GET"]),
    Route("/v2/health/live", live, methods=["GET"]),  # KServe's open inference protocol names
    Route("/v2/health/ready", ready, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/openapi.json", openapi_document, methods=["GET"]),
]


async def _api_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, RequestError):
        error = ApiError.from_request_error(exc)
    elif isinstance(exc, HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        error = ApiError(exc.status_code, str(exc.detail), code=code, headers=exc.headers)
    else:
        assert isinstance(exc, ApiError)  # the handler of these three classes only (create_app)
        error = exc
    return error_response(error)


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path)
    return error_response(
        ApiError(500, f"internal error: {type(exc).__name__}", type="server_error", code="internal_error")
    )


def create_app(
    engine: DecoderEngine | EncoderEngine,
    settings: ServeSettings = ServeSettings(),
    *,
    api_keys: frozenset[str] = frozenset(),
    warmup: bool = True,
) -> Starlette:
    """The ASGI app for one engine. It warms up in the background: live at once, ready once warm."""
    state = ServerState(engine, settings, api_keys=api_keys)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        task = asyncio.create_task(_warm_up(state)) if warmup else None
        if task is None:
            state.status = "ready"
        yield
        if task is not None:
            task.cancel()
        state.executor.shutdown(wait=False, cancel_futures=True)
        if state.loop is not None:
            state.loop.stop()

    app = Starlette(
        routes=ROUTES,
        lifespan=lifespan,
        middleware=[Middleware(ObserveRequests, routes={r.path for r in ROUTES}, record=state.metrics.request)],
        exception_handlers={
            ApiError: _api_error,
            RequestError: _api_error,
            HTTPException: _api_error,
            Exception: _server_error,
        },
    )
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


def _startup_line(state: ServerState, sock: Any) -> str:
    """Where the server answers, under which names, and what a request that sets no sampling field gets."""
    host, port = sock.getsockname()[:2]
    scheme = "https" if state.settings.tls_cert else "http"
    line = f"{state.engine.variant.name} answers on {scheme}://{host}:{port} as {', '.join(state.model_names)}"
    if isinstance(state.engine, DecoderEngine):
        values = ", ".join(f"{k}={v}" for k, v in state.engine.defaults().items())
        line += f"; sampling defaults {values} ({state.engine.defaults_source})"
    return line


def check_engine_bounds(variant: Variant, settings: ServeSettings) -> None:
    """Refuse to serve a TensorRT engine with a batch wider than its profile (ConfigError, with the fix)."""
    from lmpack.runtime.trt_plan import ENGINE_MODEL, EngineFacts, beyond_engine

    facts = EngineFacts.from_info(variant.info)  # lmpack-model.json, read when the variant was loaded
    if facts is None or variant.onnx_path.name != ENGINE_MODEL:
        return
    if (why := beyond_engine(facts, batch=min(settings.max_batch, settings.max_concurrency))) is not None:
        raise ConfigError(f"variant {variant.name}: {why}")


def load_for_serving(path: Path | str, settings: ServeSettings) -> DecoderEngine | EncoderEngine:
    """The engine of the variant at `path` that suits this host (chosen, its TensorRT engine matched, the batch
    checked against it), as `lmpack serve` and each fleet replica load it."""
    from lmpack.runtime.select import prepare_variant

    variant = prepare_variant(
        path,
        variant=settings.variant,
        strict=settings.strict,
        engine_rebuild=settings.engine_rebuild,
        engine_cache_dir=settings.engine_cache_dir,
    )
    check_engine_bounds(variant, settings)
    return load_engine(variant, threads=settings.threads, max_tokens_limit=settings.max_tokens_limit)


def serve(
    path: Path | str, settings: ServeSettings = ServeSettings(), *, api_keys: frozenset[str] = frozenset()
) -> None:
    """Pick the variant at `path` (variant, bundle or release) for this host, then answer HTTP until a signal.

    On SIGINT or SIGTERM readiness turns off at once and running requests get `drain_seconds` to finish.
    """
    import uvicorn

    if not logging.getLogger().handlers:  # this is the process's entry point: make the selection's reasons visible
        logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    from lmpack.runtime.connections import bounded_protocol
    from lmpack.runtime.listen import listen_socket

    sock = listen_socket(settings.host, settings.port)  # before loading: a taken port fails in a moment
    engine = load_for_serving(path, settings)
    app = create_app(engine, settings, api_keys=api_keys)
    state: ServerState = app.state.lmpack
    log.info("%s", _startup_line(state, sock))

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            state.status, state.status_reason = "draining", "the server is shutting down"
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal once drained, so the process would die of SIGTERM (or show
            # KeyboardInterrupt); a drained stop is a clean one: exit 0.
            getattr(self, "_captured_signals", []).clear()

    tls: dict[str, Any] = (
        {}
        if settings.tls_cert is None
        else {"ssl_certfile": str(settings.tls_cert), "ssl_keyfile": str(settings.tls_key)}
    )
    uv_config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        timeout_graceful_shutdown=settings.drain_seconds,
        timeout_keep_alive=settings.keep_alive_seconds,
        http=bounded_protocol(header_timeout=settings.header_timeout_seconds, max_connections=settings.max_connections),
        server_header=False,
        **tls,
    )
    DrainingServer(uv_config).run(sockets=[sock])
