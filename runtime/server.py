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
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
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
from lmforge.runtime.metrics import CONTENT_TYPE, ServerMetrics
from lmforge.runtime.outputs import CompletionOutput, RequestOutput
from lmforge.runtime.serve_args import served_model_names

logger = logging.getLogger("lmforge.runtime.server")

OPEN_PATHS = frozenset({"/health", "/ping", "/metrics", "/version"})
MIN_LOGPROB = -9999.0  # what JSON gets instead of -inf


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: int | str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param
        self.code = status if code is None else code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code)


def error_response(status: int, message: str, type_: str, param: str | None = None,
                   code: int | str | None = None) -> JSONResponse:
    body = proto.ErrorResponse(error=proto.ErrorInfo(message=message, type=type_, param=param,
                                                     code=status if code is None else code))
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param)


# --- state ---------------------------------------------------------------------------------------


def default_engine_factory(args: argparse.Namespace) -> Callable[[], Any]:
    """Builds the LLMEngine from the serve flags (called on the engine thread)."""

    def build() -> Any:
        from lmforge.runtime.engine.llm_engine import EngineArgs, LLMEngine

        optional = {"max_num_batched_tokens": args.max_num_batched_tokens,  # None: the engine's default
                    "kv_cache_dtype": getattr(args, "kv_cache_dtype", None)}
        return LLMEngine(EngineArgs(
            model=args.model, dtype=args.dtype, device=args.device, seed=args.seed,
            max_model_len=args.max_model_len, block_size=args.block_size,
            gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=args.max_num_seqs,
            enable_prefix_caching=args.enable_prefix_caching, num_blocks=args.num_blocks,
            enforce_eager=args.enforce_eager, **{k: v for k, v in optional.items() if v is not None}))

    return build


class ServerState:
    """Everything the handlers share. The tokenizer here is the server's own copy."""

    def __init__(self, args: argparse.Namespace, engine_factory: Callable[[], Any] | None = None) -> None:
        self.args = args
        self.model_names = served_model_names(args)
        self.metrics = ServerMetrics(self.model_names[0], lambda: self.engine.stats())
        self.engine = AsyncLLM(engine_factory or default_engine_factory(args), max_queue=args.max_queue,
                               observer=self.metrics)
        self.tokenizer: Any = None
        self.max_model_len = 0
        self.vocab_size = 0
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
            self.max_model_len = int(model_config.max_model_len)
            self.vocab_size = int(model_config.vocab_size)
            self.tokenizer = tokenizer
            self.ready = True
            logger.info("model %s ready (max_model_len=%d)", self.model_names[0], self.max_model_len)
        except asyncio.CancelledError:  # shut down while loading
            raise
        except Exception as exc:
            self.load_error = exc
            logger.exception("model failed to load")
            self.shutdown_requested.set()
        self.load_finished = True

    def health(self) -> tuple[int, str]:
        if self.draining:
            return 503, "draining"
        if self.load_error is not None or self.engine.is_dead:
            return 503, "error"
        if not self.ready:
            return 503, "loading"
        return 200, "ok"

    def token_str(self, token_id: int) -> str:
        text = self._token_strs.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            self._token_strs[token_id] = text
        return text

    def resolve_model(self, name: str | None) -> str:
        if name is None or name in self.model_names:
            return self.model_names[0]
        raise APIError(404, f"The model `{name}` does not exist.", "NotFoundError", "model", "model_not_found")


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
                await error_response(401, "Invalid or missing API key (Authorization: Bearer <key>).",
                                     "authentication_error", None, "invalid_api_key")(scope, receive, send)
                return
        if state.draining or not state.ready:
            status = "shutting down" if state.draining else "loading the model"
            await error_response(503, f"The server is {status}; retry later.", "service_unavailable",
                                 None, "draining" if state.draining else "loading")(scope, receive, send)
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


def _engine_error(exc: BaseException) -> APIError:
    if isinstance(exc, QueueFullError):
        return APIError(429, f"Too many requests waiting: {exc}", "rate_limit_error", None, "queue_full")
    if isinstance(exc, EngineNotReadyError):
        return APIError(503, f"The engine is not accepting requests ({exc}).", "service_unavailable")
    if isinstance(exc, EngineDeadError | RequestAbortedError):
        return APIError(503, str(exc), "service_unavailable")
    if isinstance(exc, ValueError):
        return _bad_request(str(exc))
    return APIError(500, f"internal error: {exc}", "internal_error")


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list"})


def _param(loc: tuple) -> str:
    """A pydantic error location as an OpenAI `param`: 'messages.0.role'; 'body' and union branch
    tags ('str', 'list[constrained-int]') left out."""
    parts = []
    for part in loc:
        if part == "body" and not parts:
            continue
        if isinstance(part, str) and (part in _UNION_TAGS or "[" in part):
            break
        parts.append(str(part))
    return ".".join(parts)


def _sse(payload: BaseModel | dict) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


def _finite(x: float | None) -> float:
    if x is None or x != x or x < MIN_LOGPROB:
        return MIN_LOGPROB
    return float(x)


def _json(model: BaseModel) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


@dataclasses.dataclass
class _Prepared:
    """A validated request: token ids per prompt and the engine parameters."""

    prompt_ids: list[list[int]]
    prompt_texts: list[str]
    params: Any  # SamplingParams
    model: str


class _StreamCursor:
    """Per choice: how much text/tokens were already sent (outputs are cumulative)."""

    __slots__ = ("text_sent", "tokens_sent", "finished")

    def __init__(self) -> None:
        self.text_sent, self.tokens_sent, self.finished = 0, 0, False

    def take(self, c: CompletionOutput, holdback: int) -> tuple[str, int, int]:
        """(new text, first new token, end token). Holds back `holdback` chars while running so a
        stop string split across steps is never sent before the engine truncates it."""
        end = len(c.text) if c.finished else max(self.text_sent, len(c.text) - holdback)
        delta = c.text[self.text_sent:end]
        self.text_sent = max(self.text_sent, end)
        start, self.tokens_sent = self.tokens_sent, len(c.token_ids)
        self.finished = c.finished
        return delta, start, len(c.token_ids)


# --- the app ---------------------------------------------------------------------------------------


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="lmforge", version=__version__, docs_url=None, redoc_url=None)
    app.state.lmforge = state

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            message = f"Malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}"
            return error_response(400, message, "invalid_request_error")
        seen: dict[str, str] = {}  # param -> first message (a union reports once per branch)
        for e in errors:
            seen.setdefault(_param(e.get("loc", ())), str(e.get("msg")).removeprefix("Value error, "))
        message = "; ".join(f"{param or 'body'}: {msg}" for param, msg in list(seen.items())[:5])
        return error_response(400, message, "invalid_request_error", next(iter(seen), None) or None)

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

    @app.get("/v1/models")
    async def models() -> Response:
        cards = [proto.ModelCard(id=name, root=state.args.model, max_model_len=state.max_model_len)
                 for name in state.model_names]
        return _json(proto.ModelList(data=cards))

    @app.post("/tokenize")
    async def tokenize(req: proto.TokenizeRequest) -> Response:
        state.resolve_model(req.model)
        if req.messages is not None:
            ids = _chat_ids(state, req.messages, req.add_generation_prompt, False, None)
        else:
            ids = _encode(state, req.prompt, req.add_special_tokens, "prompt")
        strs = state.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return _json(proto.TokenizeResponse(count=len(ids), max_model_len=state.max_model_len, tokens=ids,
                                            token_strs=strs))

    @app.post("/detokenize")
    async def detokenize(req: proto.DetokenizeRequest) -> Response:
        state.resolve_model(req.model)
        _check_token_ids(state, req.tokens, "tokens")
        return _json(proto.DetokenizeResponse(prompt=state.tokenizer.decode(req.tokens)))

    # --- generation ---

    @app.post("/v1/completions")
    async def completions(req: proto.CompletionRequest, raw: Request) -> Response:
        prepared = _prepare_completion(state, req)
        return await _with_cancellation(raw, _serve(state, req, prepared, chat=False))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: proto.ChatCompletionRequest, raw: Request) -> Response:
        prepared = _prepare_chat(state, req)
        return await _with_cancellation(raw, _serve(state, req, prepared, chat=True))

    return GateMiddleware(app, state)  # type: ignore[return-value]


# --- request preparation (pure validation + tokenization) ------------------------------------------


def _encode(state: ServerState, text: str, add_special_tokens: bool, param: str) -> list[int]:
    try:
        return state.tokenizer.encode(text, add_special_tokens=add_special_tokens)
    except Exception as exc:  # e.g. lone UTF-16 surrogates from a JSON "\ud83d" escape
        raise _bad_request(f"the text could not be tokenized: {exc}", param) from None


def _check_token_ids(state: ServerState, ids: list[int], param: str) -> None:
    bad = next((t for t in ids if not 0 <= t < state.vocab_size), None)
    if bad is not None:
        raise _bad_request(f"token id {bad} is out of range [0, {state.vocab_size})", param)


def _resolve_max_tokens(state: ServerState, num_prompt: int, requested: int | None, explicit: bool,
                        param: str) -> int:
    room = state.max_model_len - num_prompt
    if num_prompt == 0:
        raise _bad_request("The prompt is empty.", param)
    if room <= 0:
        raise _bad_request(f"This model's maximum context length is {state.max_model_len} tokens, "
                           f"but the prompt is {num_prompt} tokens. Please shorten it.", param)
    if requested is None:
        return room
    if requested > room and explicit:
        raise _bad_request(
            f"This model's maximum context length is {state.max_model_len} tokens. However, you requested "
            f"{num_prompt + requested} tokens ({num_prompt} in the prompt, {requested} for the completion). "
            "Please reduce the length of the prompt or the completion.", "max_tokens")
    return min(requested, room)


def _sampling_params(req: proto.SamplingFields, max_tokens: int, logprobs: int | None) -> Any:
    try:
        return req.to_sampling_params(max_tokens, logprobs)
    except ValueError as exc:
        raise _bad_request(str(exc)) from None


def _prepare_completion(state: ServerState, req: proto.CompletionRequest) -> _Prepared:
    model = state.resolve_model(req.model)
    ids_list, texts = [], []
    for prompt in req.prompts():
        if isinstance(prompt, str):
            ids, text = _encode(state, prompt, True, "prompt"), prompt
        else:
            _check_token_ids(state, prompt, "prompt")
            ids, text = prompt, state.tokenizer.decode(prompt) if req.echo else ""
        ids_list.append(ids)
        texts.append(text)
    explicit = "max_tokens" in req.model_fields_set
    max_tokens = min(_resolve_max_tokens(state, len(ids), req.max_tokens, explicit, "prompt") for ids in ids_list)
    return _Prepared(ids_list, texts, _sampling_params(req, max_tokens, req.logprobs), model)


def _chat_ids(state: ServerState, messages: list[proto.ChatMessage], add_generation_prompt: bool,
              continue_final_message: bool, template_kwargs: dict | None) -> list[int]:
    try:
        conversation = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                        for m in messages]
        kwargs: dict[str, Any] = dict(template_kwargs or {})
        if continue_final_message:
            kwargs["continue_final_message"] = True
        text = state.tokenizer.apply_chat_template(conversation, tokenize=False,
                                                   add_generation_prompt=add_generation_prompt, **kwargs)
    except ValueError as exc:
        raise _bad_request(str(exc), "messages") from None
    except Exception as exc:  # jinja2 TemplateError and friends: the template rejected the conversation
        raise _bad_request(f"chat template failed: {exc}", "messages") from None
    return _encode(state, text, False, "messages")


def _prepare_chat(state: ServerState, req: proto.ChatCompletionRequest) -> _Prepared:
    model = state.resolve_model(req.model)
    ids = _chat_ids(state, req.messages, req.add_generation_prompt, req.continue_final_message,
                    req.chat_template_kwargs)
    requested = req.requested_max_tokens()
    max_tokens = _resolve_max_tokens(state, len(ids), requested, requested is not None, "messages")
    return _Prepared([ids], [""], _sampling_params(req, max_tokens, req.num_logprobs()), model)


# --- generation ------------------------------------------------------------------------------------


async def _serve(state: ServerState, req: proto.CompletionRequest | proto.ChatCompletionRequest,
                 prepared: _Prepared, chat: bool) -> Response:
    response_id = proto.random_id("chatcmpl" if chat else "cmpl")
    gens = [state.engine.generate(ids, prepared.params, f"{response_id}-{i}")
            for i, ids in enumerate(prepared.prompt_ids)]
    try:
        firsts = await start_streams(gens)
    except (QueueFullError, EngineNotReadyError, EngineDeadError, RequestAbortedError, ValueError) as exc:
        if isinstance(exc, QueueFullError):
            state.metrics.observe_rejected("queue_full")
        raise _engine_error(exc) from None
    stream = merge_streams(gens, firsts)
    if req.stream:
        body = _chat_stream(state, req, prepared, response_id, stream) if chat else \
            _completion_stream(state, req, prepared, response_id, stream)
        return StreamingResponse(body, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    finals: dict[int, RequestOutput] = {}
    try:
        async with contextlib.aclosing(stream):
            async for i, out in stream:
                finals[i] = out
    except (RequestAbortedError, EngineDeadError) as exc:
        raise _engine_error(exc) from None
    return _json(_chat_response(state, req, prepared, response_id, finals) if chat else
                 _completion_response(state, req, prepared, response_id, finals))


def _usage(prepared: _Prepared, finals: dict[int, RequestOutput]) -> proto.UsageInfo:
    prompt = sum(len(ids) for ids in prepared.prompt_ids)
    completion = sum(len(c.token_ids) for out in finals.values() for c in out.outputs)
    return proto.UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _completion_logprobs(state: ServerState, c: CompletionOutput, start: int, end: int, k: int,
                         offset: int) -> proto.CompletionLogprobs:
    """Tokens [start, end) of `c`; text offsets start at `offset`."""
    result = proto.CompletionLogprobs()
    for token_id, dist in zip(c.token_ids[start:end], (c.logprobs or [])[start:end], strict=False):
        token = state.token_str(token_id)
        result.tokens.append(token)
        result.token_logprobs.append(_finite(dist.get(token_id)))
        top = sorted(dist.items(), key=lambda kv: -kv[1])[:k]
        if token_id not in dict(top) and token_id in dist:
            top.append((token_id, dist[token_id]))
        result.top_logprobs.append({state.token_str(t): _finite(v) for t, v in top})
        result.text_offset.append(offset)
        offset += len(token)
    return result


def _chat_logprobs(state: ServerState, c: CompletionOutput, start: int, end: int,
                   k: int) -> proto.ChatChoiceLogprobs:
    content = []
    for token_id, dist in zip(c.token_ids[start:end], (c.logprobs or [])[start:end], strict=False):
        token = state.token_str(token_id)
        top = sorted(dist.items(), key=lambda kv: -kv[1])[:k]
        content.append(proto.ChatLogprobEntry(
            token=token, logprob=_finite(dist.get(token_id)), bytes=list(token.encode()),
            top_logprobs=[proto.ChatLogprob(token=(s := state.token_str(t)), logprob=_finite(v),
                                            bytes=list(s.encode())) for t, v in top]))
    return proto.ChatChoiceLogprobs(content=content)


def _choice_index(prompt_index: int, c: CompletionOutput, n: int) -> int:
    return prompt_index * n + c.index


def _completion_response(state: ServerState, req: proto.CompletionRequest, prepared: _Prepared,
                         response_id: str, finals: dict[int, RequestOutput]) -> proto.CompletionResponse:
    choices = []
    for i in sorted(finals):
        for c in finals[i].outputs:
            prefix = prepared.prompt_texts[i] if req.echo else ""
            logprobs = None
            if req.logprobs is not None:
                logprobs = _completion_logprobs(state, c, 0, len(c.token_ids), req.logprobs, len(prefix))
            choices.append(proto.CompletionChoice(index=_choice_index(i, c, req.n), text=prefix + c.text,
                                                  logprobs=logprobs, finish_reason=c.finish_reason,
                                                  stop_reason=c.stop_reason))
    choices.sort(key=lambda ch: ch.index)
    return proto.CompletionResponse(id=response_id, model=prepared.model, choices=choices,
                                    usage=_usage(prepared, finals))


def _chat_response(state: ServerState, req: proto.ChatCompletionRequest, prepared: _Prepared,
                   response_id: str, finals: dict[int, RequestOutput]) -> proto.ChatCompletionResponse:
    k = req.num_logprobs()
    choices = [
        proto.ChatCompletionChoice(
            index=c.index, message=proto.ChatResponseMessage(content=c.text),
            logprobs=None if k is None else _chat_logprobs(state, c, 0, len(c.token_ids), k),
            finish_reason=c.finish_reason, stop_reason=c.stop_reason)
        for out in finals.values() for c in out.outputs
    ]
    choices.sort(key=lambda ch: ch.index)
    return proto.ChatCompletionResponse(id=response_id, model=prepared.model, choices=choices,
                                        usage=_usage(prepared, finals))


def _holdback(req: proto.SamplingFields) -> int:
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    return max((len(s) for s in stops), default=1) - 1


async def _sse_errors(body: AsyncIterator[str], stream: AsyncIterator[Any]) -> AsyncIterator[str]:
    """An engine failure mid-stream becomes an error event (headers are already sent). Closing
    this closes `body` and `stream` (and so aborts the engine requests) right away, not at GC."""
    try:
        async with contextlib.aclosing(stream), contextlib.aclosing(body):
            async for event in body:
                yield event
    except (RequestAbortedError, EngineDeadError) as exc:
        err = _engine_error(exc)
        yield _sse(proto.ErrorResponse(error=proto.ErrorInfo(message=err.message, type=err.type, code=err.status)))
        yield "data: [DONE]\n\n"


def _completion_stream(state: ServerState, req: proto.CompletionRequest, prepared: _Prepared,
                       response_id: str, stream: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[str]:
    async def body() -> AsyncIterator[str]:
        created, holdback = int(time.time()), _holdback(req)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = bool(include_usage and req.stream_options.continuous_usage_stats)
        cursors: dict[int, _StreamCursor] = {}
        finals: dict[int, RequestOutput] = {}
        async for i, out in stream:
            finals[i] = out
            choices = []
            for c in out.outputs:
                index = _choice_index(i, c, req.n)
                cursor = cursors.get(index)
                if cursor is None:
                    cursor = cursors[index] = _StreamCursor()
                    prefix = prepared.prompt_texts[i] if req.echo else ""
                else:
                    prefix = ""
                if cursor.finished:
                    continue
                delta, start, end = cursor.take(c, holdback)
                if not delta and not prefix and start == end and not c.finished:
                    continue
                logprobs = None
                if req.logprobs is not None:
                    logprobs = _completion_logprobs(state, c, start, end, req.logprobs, 0)
                choices.append(proto.CompletionChoice(index=index, text=prefix + delta, logprobs=logprobs,
                                                      finish_reason=c.finish_reason, stop_reason=c.stop_reason))
            if choices:
                chunk = proto.CompletionResponse(id=response_id, created=created, model=prepared.model,
                                                 choices=choices,
                                                 usage=_usage(prepared, finals) if continuous else None)
                yield _sse(chunk)
        if include_usage:
            yield _sse(proto.CompletionResponse(id=response_id, created=created, model=prepared.model, choices=[],
                                                usage=_usage(prepared, finals)))
        yield "data: [DONE]\n\n"

    return _sse_errors(body(), stream)


def _chat_stream(state: ServerState, req: proto.ChatCompletionRequest, prepared: _Prepared,
                 response_id: str, stream: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[str]:
    async def body() -> AsyncIterator[str]:
        created, holdback, k = int(time.time()), _holdback(req), req.num_logprobs()
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = bool(include_usage and req.stream_options.continuous_usage_stats)
        cursors: dict[int, _StreamCursor] = {}
        finals: dict[int, RequestOutput] = {}

        def chunk(choices: list[proto.ChatStreamChoice]) -> str:
            return _sse(proto.ChatCompletionChunk(id=response_id, created=created, model=prepared.model,
                                                  choices=choices,
                                                  usage=_usage(prepared, finals) if continuous else None))

        yield chunk([proto.ChatStreamChoice(index=i, delta=proto.DeltaMessage(role="assistant", content=""))
                     for i in range(req.n)])
        async for _, out in stream:
            finals[0] = out
            choices = []
            for c in out.outputs:
                cursor = cursors.setdefault(c.index, _StreamCursor())
                if cursor.finished:
                    continue
                delta, start, end = cursor.take(c, holdback)
                if not delta and start == end and not c.finished:
                    continue
                choices.append(proto.ChatStreamChoice(
                    index=c.index, delta=proto.DeltaMessage(content=delta or None),
                    logprobs=None if k is None else _chat_logprobs(state, c, start, end, k),
                    finish_reason=c.finish_reason, stop_reason=c.stop_reason))
            if choices:
                yield chunk(choices)
        if include_usage:
            yield _sse(proto.ChatCompletionChunk(id=response_id, created=created, model=prepared.model, choices=[],
                                                 usage=_usage(prepared, finals)))
        yield "data: [DONE]\n\n"

    return _sse_errors(body(), stream)


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


async def serve_async(args: argparse.Namespace, engine_factory: Callable[[], Any] | None = None,
                      state: ServerState | None = None) -> int:
    import uvicorn

    state = state or ServerState(args, engine_factory)
    app = build_app(state)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            access_log=args.log_level == "debug", timeout_graceful_shutdown=2,
                            timeout_keep_alive=5, lifespan="off")
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
    await state.engine.shutdown(timeout=10.0)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
    if state.load_error is not None:
        return 1
    return 0


QUANTIZATION_WEIGHTS = {"w8a16": (8, "int"), "w4a16": (4, "int"), "fp8": (8, "float")}


def unsupported_model_flags(args: argparse.Namespace) -> str | None:
    """Refuse at start-up, with a reason, what would otherwise fail later or silently differ: a
    checkpoint whose quantization is not the one the InferenceService asked for, and KV cache
    types the engine does not implement yet."""
    if getattr(args, "kv_cache_dtype", "auto") not in ("auto", "int8"):
        return f"--kv-cache-dtype {args.kv_cache_dtype} is not implemented by this runtime yet (use auto or int8)"
    expected = getattr(args, "quantization", None)
    if expected is None:
        return None
    import json

    with open(os.path.join(args.model, "config.json")) as f:
        qconfig = json.load(f).get("quantization_config") or {}
    groups = qconfig.get("config_groups") or {}
    found = {(g.get("weights") or {}).get("num_bits"): (g.get("weights") or {}).get("type") for g in groups.values()}
    bits, kind = QUANTIZATION_WEIGHTS[expected]
    if qconfig.get("quant_method") != "compressed-tensors" or found.get(bits) != kind:
        return (f"--quantization {expected} but {args.model}/config.json declares "
                f"{qconfig.get('quant_method') or 'no quantization'} {found or ''}".rstrip())
    return None


def limit_cpu_threads() -> None:
    """Leave one core to the HTTP event loop. torch's intra-op pool otherwise takes every core and
    the engine thread and the server thread preempt each other: measured on 2 cores, one engine
    step went from 1.8 ms to 18 ms. An explicit OMP_NUM_THREADS always wins."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))


def run_server(args: argparse.Namespace) -> int:
    """`lmforge serve`: blocks until shut down; 0 after a graceful shutdown, 1 if loading failed."""
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        print(f"lmforge serve: {args.model!r} is not a model directory (no config.json)", file=sys.stderr)
        return 2
    problem = unsupported_model_flags(args)
    if problem:
        print(f"lmforge serve: {problem}", file=sys.stderr)
        return 2
    limit_cpu_threads()
    state = ServerState(args)
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
