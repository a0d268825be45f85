"""OpenAI-compatible HTTP server (FastAPI + uvicorn) over AsyncLLM.

Lifecycle of `lmforge serve`:
1. uvicorn starts listening; /health answers 503 {"status": "loading"} and /v1/* 503;
2. the engine thread loads the model, the server loads its own tokenizer copy (the engine's is
   used on the engine thread only); /health turns 200;
3. SIGTERM/SIGINT: /health and new requests get 503, in-flight requests run to completion for up to
   --graceful-shutdown-seconds, then uvicorn stops, the engine thread stops, exit code 0.
   A second signal skips the wait.

Every error body is OpenAI's `{"error": {"message", "type", "param", "code"}}`: validation 400,
auth 401, unknown model 404, queue full 429, loading/draining 503.

This module is the I/O layer: app wiring, routes, admission, lifecycle, metrics. Requests become
engine input in openai_requests; engine outputs become response bodies and SSE in openai_responses.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import logging
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge import __version__
from lmforge.runtime import openai_protocol as proto
from lmforge.runtime.async_engine import (
    AsyncLLM,
    EngineDeadError,
    EngineNotReadyError,
    QueueFullError,
    RequestAbortedError,
    merge_streams,
    start_streams,
)
from lmforge.runtime.lora.request import LoRARequest
from lmforge.runtime.metrics import CONTENT_TYPE, ServerMetrics
from lmforge.runtime.openai_requests import (
    APIError,
    ModelContext,
    Prepared,
    chat_ids,
    check_token_ids,
    encode,
    prepare_chat,
    prepare_completion,
    prepare_embedding,
    validation_error,
)
from lmforge.runtime.openai_responses import (
    chat_response,
    chat_stream,
    completion_response,
    completion_stream,
    embedding_response,
    engine_error,
    with_error_event,
)
from lmforge.runtime.outputs import RequestOutput
from lmforge.runtime.responses_api import ResponsesRequest, final_response, response_stream, to_chat_request
from lmforge.runtime.serve_args import lora_modules, served_model_names
from lmforge.runtime.serve_startup import limit_cpu_threads, local_model_dir, unsupported_model_flags

logger = logging.getLogger("lmforge.runtime.server")

OPEN_PATHS = frozenset({"/health", "/ping", "/metrics", "/version"})


def error_response(
    status: int, message: str, type_: str, param: str | None = None, code: int | str | None = None
) -> JSONResponse:
    return api_error_response(APIError(status, message, type_, param, code))


def api_error_response(exc: APIError) -> JSONResponse:
    """The OpenAI error body; a 401 also says which scheme to use (RFC 9110)."""
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body().model_dump(), status_code=exc.status, headers=headers)


# --- state ---------------------------------------------------------------------------------------


def default_engine_factory(args: argparse.Namespace) -> Callable[[], Any]:
    """Builds the LLMEngine from the serve flags (called on the engine thread)."""

    def build() -> Any:
        from lmforge.runtime.engine.llm_engine import EngineArgs, LLMEngine
        from lmforge.runtime.pooling_params import PoolerConfig

        pooler = getattr(args, "pooler_config", None)
        optional = {
            "max_num_batched_tokens": args.max_num_batched_tokens,  # None: the engine's default
            "kv_cache_dtype": getattr(args, "kv_cache_dtype", None),
            "load_format": getattr(args, "load_format", None),
            "task": getattr(args, "task", None),
            "pooler_config": None if pooler is None else PoolerConfig.from_json(pooler),
        }
        lora = {}
        if getattr(args, "enable_lora", False):
            lora = dict(enable_lora=True, max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                        max_cpu_loras=args.max_cpu_loras, lora_modules=lora_modules(args))  # fmt: skip
        return LLMEngine(
            EngineArgs(
                model=args.model,
                dtype=args.dtype,
                device=args.device,
                seed=args.seed,
                max_model_len=args.max_model_len,
                block_size=args.block_size,
                gpu_memory_utilization=args.gpu_memory_utilization,
                max_num_seqs=args.max_num_seqs,
                enable_prefix_caching=args.enable_prefix_caching,
                num_blocks=args.num_blocks,
                enforce_eager=args.enforce_eager,
                tensor_parallel_size=getattr(args, "tensor_parallel_size", 1),
                **{k: v for k, v in optional.items() if v is not None},
                **lora,
            )
        )

    return build


class ServerState:
    """Everything the handlers share. The tokenizer here is the server's own copy."""

    def __init__(self, args: argparse.Namespace, engine_factory: Callable[[], Any] | None = None) -> None:
        self.args = args
        self.model_names = served_model_names(args)
        # LoRA adapter name -> its directory, as clients see them (the engine thread holds the weights)
        self.adapters: dict[str, str] = lora_modules(args)
        self.metrics = ServerMetrics(self.model_names[0], lambda: self.engine.stats())
        self.engine = AsyncLLM(
            engine_factory or default_engine_factory(args),
            max_queue=args.max_queue,
            observer=self.metrics,
            on_fatal=self._on_fatal,
        )
        self.fatal_error: str | None = None  # a tensor-parallel worker died or hung: exit non-zero
        self.context: ModelContext | None = None  # set once the model and the tokenizer are loaded
        self.ready = False
        self.draining = False
        self.num_inflight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.shutdown_requested = asyncio.Event()
        self.force_stop = asyncio.Event()
        self.load_error: BaseException | None = None
        self.load_finished = False  # loader threads done (ready or failed)
        self._token_strs: dict[int, str] = {}

    async def load(self) -> None:
        """Engine (on its thread) and tokenizer (in a worker thread) load concurrently."""
        try:
            await _in_daemon_thread(_import_transformers)
            self.engine.start()
            tokenizer = await _in_daemon_thread(_load_tokenizer, self.args.model)
            await self.engine.wait_loaded()
            model_config = self.engine.engine.model_config  # immutable once loaded
            self.context = ModelContext(
                tokenizer,
                int(model_config.max_model_len),
                int(model_config.vocab_size),
                tool_call_parser=getattr(self.args, "tool_call_parser", None),
                enable_auto_tool_choice=getattr(self.args, "enable_auto_tool_choice", False),
                task=getattr(self.args, "task", "generate"),
                hidden_size=int(getattr(model_config, "hidden_size", 0)),
            )
            self.ready = True
            logger.info("model %s ready (max_model_len=%d)", self.model_names[0], self.context.max_model_len)
        except asyncio.CancelledError:  # shut down while loading
            raise
        except Exception as exc:
            self.load_error = exc
            logger.exception("model failed to load")
            self.shutdown_requested.set()
        self.load_finished = True

    def _on_fatal(self, reason: str) -> None:
        """On the event loop: the engine cannot go on (AsyncLLM already failed every request)."""
        self.fatal_error = reason
        logger.error("engine failed fatally, shutting down: %s", reason)
        self.force_stop.set()
        self.shutdown_requested.set()

    def health(self) -> tuple[int, str]:
        if self.draining:
            return 503, "draining"
        if self.load_error is not None or self.engine.is_dead:
            return 503, "error"
        if not self.ready:
            return 503, "loading"
        return 200, "ok"

    def loaded(self) -> ModelContext:
        """The model and tokenizer; GateMiddleware keeps every route that needs them out until then."""
        if self.context is None:
            raise APIError(
                503, "The server is loading the model; retry later.", "service_unavailable", None, "loading"
            )
        return self.context

    def generating(self) -> ModelContext:
        """The context of a server that generates text (not one started with --task embed)."""
        context = self.loaded()
        if context.task != "generate":
            raise APIError(
                400,
                f"This server runs --task {context.task}: text generation is not served.",
                "invalid_request_error",
                "model",
            )
        return context

    def lora_request(self, model: str) -> LoRARequest | None:
        """The adapter a resolved model name runs with (None: the base model)."""
        return LoRARequest(model) if model in self.adapters else None

    def token_str(self, token_id: int) -> str:
        """A token's text alone, cached: logprobs ask for the same few thousand ids over and over."""
        text = self._token_strs.get(token_id)
        if text is None:
            text = self.loaded().tokenizer.decode([token_id])
            self._token_strs[token_id] = text
        return text

    def resolve_model(self, name: str | None) -> str:
        if name is None or name in self.model_names:
            return self.model_names[0]
        if name in self.adapters:
            return name
        raise APIError(
            404, f"The model `{name}` does not exist.", "NotFoundError", "model", "model_not_found"
        )


async def _in_daemon_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Like asyncio.to_thread, but the thread does not hold up asyncio.run's exit when the caller
    is cancelled (a shutdown while the tokenizer is still loading)."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def work() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            result, error = None, exc
        if not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=work, name=f"lmforge-{fn.__name__}", daemon=True).start()
    return await future


def _import_transformers() -> None:
    """Once, before the engine and tokenizer threads start: transformers' lazy module is not safe to
    import from two threads at once (the loser gets `cannot import name 'AutoTokenizer'`)."""
    from transformers import AutoConfig, AutoTokenizer  # noqa: F401


def _load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


# --- middleware: auth, admission, in-flight count -------------------------------------------------


class GateMiddleware:
    """Pure ASGI (streaming-safe): API key, 503 while loading/draining, in-flight accounting."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        state = self.state
        if state.args.api_key:
            headers = dict(scope["headers"])
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {state.args.api_key}".encode()):
                await error_response(
                    401,
                    "Invalid or missing API key (Authorization: Bearer <key>).",
                    "authentication_error",
                    None,
                    "invalid_api_key",
                )(scope, receive, send)
                return
        if state.draining or not state.ready:
            status = "shutting down" if state.draining else "loading the model"
            await error_response(
                503,
                f"The server is {status}; retry later.",
                "service_unavailable",
                None,
                "draining" if state.draining else "loading",
            )(scope, receive, send)
            return
        state.num_inflight += 1
        state.idle.clear()
        try:
            await self.app(scope, receive, send)
        finally:
            state.num_inflight -= 1
            if state.num_inflight == 0:
                state.idle.set()


# --- helpers ---------------------------------------------------------------------------------------


async def _with_cancellation(request: Request, work: Awaitable[Response]) -> Response:
    """Runs `work`, cancelling it if the client disconnects first (aborting its engine requests)."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled() or not task.done():
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return Response(status_code=499)
    return task.result()


def _json(model: BaseModel) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


# --- the app ---------------------------------------------------------------------------------------


def build_app(state: ServerState) -> FastAPI:  # noqa: C901 - one closure per route over the app state, as FastAPI apps are written
    app = FastAPI(title="lmforge", version=__version__, docs_url=None, redoc_url=None)
    app.state.lmforge = state

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return api_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return api_error_response(validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "NotFoundError" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}", "internal_error")

    # --- plain endpoints ---

    @app.get("/health")
    async def health() -> Response:
        status, text = state.health()
        return JSONResponse({"status": text}, status_code=status)

    @app.get("/ping")
    async def ping() -> Response:
        return await health()

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    def card(name: str) -> proto.ModelCard:
        context = state.loaded()
        adapter = state.adapters.get(name)
        return proto.ModelCard(
            id=name,
            root=state.args.model if adapter is None else adapter,
            parent=None if adapter is None else state.model_names[0],
            max_model_len=context.max_model_len,
            task=context.task,
        )

    @app.get("/v1/models")
    async def models() -> Response:
        return _json(proto.ModelList(data=[card(name) for name in [*state.model_names, *state.adapters]]))

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Response:  # what client.models.retrieve calls
        if model_id not in state.model_names and model_id not in state.adapters:
            raise APIError(
                404, f"The model `{model_id}` does not exist.", "NotFoundError", "model", "model_not_found"
            )
        return _json(card(model_id))

    if getattr(state.args, "allow_runtime_lora_updating", False):
        add_lora_routes(app, state)

    @app.post("/tokenize")
    async def tokenize(req: proto.TokenizeRequest) -> Response:
        state.resolve_model(req.model)
        context = state.loaded()
        if req.messages is not None:
            ids = chat_ids(context.tokenizer, req.messages, req.add_generation_prompt, False, None)
        else:
            assert req.prompt is not None  # TokenizeRequest: prompt or messages
            ids = encode(context.tokenizer, req.prompt, req.add_special_tokens, "prompt")
        strs = context.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return _json(
            proto.TokenizeResponse(
                count=len(ids), max_model_len=context.max_model_len, tokens=ids, token_strs=strs
            )
        )

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> Response:
        """What a client needs to tokenize as the server does (lm-eval probes this, as vLLM serves it)."""
        context = state.loaded()
        tok = context.tokenizer
        info = {
            "tokenizer_class": type(tok).__name__,
            "model_max_length": context.max_model_len,
            "vocab_size": len(tok),
            "chat_template": tok.chat_template,
            **{
                name: getattr(tok, name, None)
                for name in ("bos_token", "eos_token", "pad_token", "unk_token")
            },
            "added_tokens_decoder": {str(i): t.content for i, t in sorted(tok.added_tokens_decoder.items())},
        }
        return JSONResponse(info)

    @app.post("/detokenize")
    async def detokenize(req: proto.DetokenizeRequest) -> Response:
        state.resolve_model(req.model)
        context = state.loaded()
        check_token_ids(req.tokens, context.vocab_size, "tokens")
        return _json(proto.DetokenizeResponse(prompt=context.tokenizer.decode(req.tokens)))

    # --- generation ---

    @app.post("/v1/completions")
    async def completions(req: proto.CompletionRequest, raw: Request) -> Response:
        prepared = prepare_completion(req, state.generating(), state.resolve_model(req.model))
        return await _with_cancellation(raw, _serve(state, req, prepared))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: proto.ChatCompletionRequest, raw: Request) -> Response:
        prepared = prepare_chat(req, state.generating(), state.resolve_model(req.model))
        return await _with_cancellation(raw, _serve(state, req, prepared))

    @app.post("/v1/responses")
    async def responses(req: ResponsesRequest, raw: Request) -> Response:
        chat = to_chat_request(req)
        prepared = prepare_chat(chat, state.generating(), state.resolve_model(req.model))
        return await _with_cancellation(raw, _serve_responses(state, req, prepared))

    @app.post("/v1/embeddings")
    async def embeddings(req: proto.EmbeddingRequest, raw: Request) -> Response:
        prepared = prepare_embedding(req, state.loaded(), state.resolve_model(req.model))
        return await _with_cancellation(raw, _serve_embeddings(state, req, prepared))

    return GateMiddleware(app, state)  # type: ignore[return-value]


# --- LoRA adapters at run time (vLLM's endpoints) ----------------------------------------------------


def add_lora_routes(app: FastAPI, state: ServerState) -> None:
    """POST /v1/load_lora_adapter {lora_name, lora_path} and /v1/unload_lora_adapter {lora_name}: the
    engine thread reads and checks the adapter between two steps; a bad one is a 400 naming the file."""

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(req: proto.LoadLoRAAdapterRequest) -> Response:
        state.loaded()
        if req.lora_name in state.adapters or req.lora_name in state.model_names:
            raise APIError(400, f"The LoRA adapter '{req.lora_name}' has already been loaded.",
                           "invalid_request_error", "lora_name")  # fmt: skip
        request = LoRARequest(req.lora_name, req.lora_path)
        try:
            await state.engine.call(lambda engine: engine.add_lora(request))
        except ValueError as exc:
            raise APIError(400, str(exc), "invalid_request_error", "lora_path") from None
        state.adapters[req.lora_name] = req.lora_path
        logger.info("LoRA adapter %s loaded from %s", req.lora_name, req.lora_path)
        return Response(
            f"Success: LoRA adapter '{req.lora_name}' added successfully.", media_type="text/plain"
        )

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(req: proto.UnloadLoRAAdapterRequest) -> Response:
        state.loaded()
        if req.lora_name not in state.adapters:
            raise APIError(404, f"The LoRA adapter '{req.lora_name}' cannot be found.", "NotFoundError",
                           "lora_name", "model_not_found")  # fmt: skip
        del state.adapters[req.lora_name]  # new requests stop picking it at once
        await state.engine.call(lambda engine: engine.remove_lora(req.lora_name))
        logger.info("LoRA adapter %s unloaded", req.lora_name)
        return Response(
            f"Success: LoRA adapter '{req.lora_name}' removed successfully.", media_type="text/plain"
        )


# --- generation ------------------------------------------------------------------------------------


async def _start(state: ServerState, gens: list) -> Any:
    """Starts every engine request and merges their streams; the engine's refusals (a full queue,
    not ready, dead, aborted, a bad prompt) become HTTP errors before any byte is sent."""
    try:
        firsts = await start_streams(gens)
    except (QueueFullError, EngineNotReadyError, EngineDeadError, RequestAbortedError, ValueError) as exc:
        if isinstance(exc, QueueFullError):
            state.metrics.observe_rejected("queue_full")
        raise engine_error(exc) from None
    return merge_streams(gens, firsts)


def _event_stream(body: Any, stream: Any) -> StreamingResponse:
    """An SSE response; an engine failure mid-stream becomes an error event (with_error_event)."""
    return StreamingResponse(
        with_error_event(body, stream),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _collect(stream: Any) -> dict[int, RequestOutput]:
    """The last output of every request of a merged stream, by its index."""
    finals: dict[int, RequestOutput] = {}
    try:
        async with contextlib.aclosing(stream):
            async for i, out in stream:
                finals[i] = out
    except (RequestAbortedError, EngineDeadError) as exc:
        raise engine_error(exc) from None
    return finals


def _generate_all(state: ServerState, prepared: Prepared, response_id: str) -> list:
    lora = state.lora_request(prepared.model)
    return [
        state.engine.generate(ids, prepared.params, f"{response_id}-{i}", lora_request=lora)
        for i, ids in enumerate(prepared.prompt_ids)
    ]


async def _serve(
    state: ServerState,
    req: proto.CompletionRequest | proto.ChatCompletionRequest,
    prepared: Prepared,
) -> Response:
    chat = isinstance(req, proto.ChatCompletionRequest)
    response_id = proto.random_id("chatcmpl" if chat else "cmpl")
    stream = await _start(state, _generate_all(state, prepared, response_id))
    if isinstance(req, proto.ChatCompletionRequest):
        if req.stream:
            return _event_stream(chat_stream(req, prepared, response_id, stream, state.token_str), stream)
        return _json(chat_response(req, prepared, response_id, await _collect(stream), state.token_str))
    if req.stream:
        return _event_stream(completion_stream(req, prepared, response_id, stream, state.token_str), stream)
    return _json(completion_response(req, prepared, response_id, await _collect(stream), state.token_str))


async def _serve_responses(state: ServerState, req: ResponsesRequest, prepared: Prepared) -> Response:
    response_id = proto.random_id("resp")
    stream = await _start(
        state,
        [
            state.engine.generate(
                prepared.prompt_ids[0],
                prepared.params,
                response_id,
                lora_request=state.lora_request(prepared.model),
            )
        ],
    )
    if req.stream:
        return _event_stream(response_stream(req, prepared, response_id, stream), stream)
    return JSONResponse(final_response(req, prepared, response_id, (await _collect(stream))[0]))


async def _serve_embeddings(state: ServerState, req: proto.EmbeddingRequest, prepared: Prepared) -> Response:
    """Every input is one engine request; the engine batches them like any prompts."""
    response_id = proto.random_id("embd")
    stream = await _start(state, _generate_all(state, prepared, response_id))
    return _json(embedding_response(req, prepared, await _collect(stream)))


# --- process entry point ---------------------------------------------------------------------------


def _make_server(config: Any) -> Any:
    """uvicorn.Server without its signal capture (which re-raises SIGTERM after shutdown and would
    turn a graceful exit into exit code -15); serve_async installs its own handlers."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # noqa: ANN202
            yield

    return Server(config)


async def _drain(state: ServerState, server: Any, grace_s: float) -> None:
    """After a shutdown request: refuse new work, wait for in-flight requests (until the grace
    period ends or a second signal), abort what is left, stop uvicorn."""
    state.draining = True
    if state.num_inflight:
        logger.info("draining %d in-flight request(s), up to %.0fs", state.num_inflight, grace_s)
        waits = {asyncio.ensure_future(state.idle.wait()), asyncio.ensure_future(state.force_stop.wait())}
        await asyncio.wait(waits, timeout=grace_s, return_when=asyncio.FIRST_COMPLETED)
        for task in waits:
            task.cancel()
        if state.num_inflight:
            logger.warning("stopping with %d request(s) in flight: aborting them", state.num_inflight)
            await state.engine.shutdown(timeout=10.0)  # their streams end with an error event
    server.should_exit = True


async def serve_async(
    args: argparse.Namespace,
    engine_factory: Callable[[], Any] | None = None,
    state: ServerState | None = None,
) -> int:
    import uvicorn

    state = state or ServerState(args, engine_factory)
    app = build_app(state)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.log_level == "debug",
        timeout_graceful_shutdown=2,
        timeout_keep_alive=5,
        lifespan="off",
    )
    server = _make_server(config)
    loop = asyncio.get_running_loop()
    signals: list[int] = []

    def on_signal(sig: int) -> None:
        signals.append(sig)
        if len(signals) > 1:  # second signal: stop waiting for in-flight requests
            state.force_stop.set()
        logger.info("received %s: shutting down gracefully", signal.Signals(sig).name)
        state.shutdown_requested.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)

    serve_task = asyncio.create_task(server.serve())
    while not server.started and not serve_task.done():
        await asyncio.sleep(0.02)
    if serve_task.done():  # could not bind
        with contextlib.suppress(BaseException):
            serve_task.result()
        return 1
    load_task = asyncio.create_task(state.load())
    stop_task = asyncio.create_task(state.shutdown_requested.wait())
    await asyncio.wait({serve_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
    if not serve_task.done():
        await _drain(state, server, args.graceful_shutdown_seconds)
        await serve_task
    stop_task.cancel()
    load_task.cancel()
    await asyncio.gather(load_task, stop_task, return_exceptions=True)
    # a fatal engine may sit in a collective that never returns: do not wait long for its thread
    await state.engine.shutdown(timeout=1.0 if state.fatal_error else 10.0)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
    if state.load_error is not None or state.fatal_error is not None:
        return 1
    return 0


def run_server(args: argparse.Namespace) -> int:
    """`lmforge serve`: blocks until shut down; 0 after a graceful shutdown, 1 if loading failed."""
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    problem = local_model_dir(args)
    if problem:
        print(f"lmforge serve: {problem}", file=sys.stderr)
        return 1
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        print(f"lmforge serve: {args.model!r} is not a model directory (no config.json)", file=sys.stderr)
        return 2
    problem = unsupported_model_flags(args)
    if problem:
        print(f"lmforge serve: {problem}", file=sys.stderr)
        return 2
    limit_cpu_threads()
    state = ServerState(args)
    from lmforge.runtime.storage.transfer import holding

    with holding(Path(args.model)):  # the node cache entry the model links into is not evicted meanwhile
        code = asyncio.run(serve_async(args, state=state))
    if state.engine.thread_alive or not state.load_finished:
        # Stopped while the model was still loading: interpreter teardown would race the loader
        # thread inside torch (and abort), so leave now; sockets are closed, logs flushed.
        logger.info("exiting while the model is still loading")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
