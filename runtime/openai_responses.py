"""Engine outputs -> OpenAI response bodies: completions, chat completions, their SSE chunks, usage,
logprobs.

No I/O: the stream builders only iterate the (prompt index, RequestOutput) stream they are given.
Engine outputs are cumulative (each RequestOutput holds all text so far), so streams keep a
`StreamCursor` per choice to send only what is new. Engine failures become an `APIError` before
the first byte is sent and an SSE error event after (`with_error_event`).
"""

from __future__ import annotations

import base64
import contextlib
import json
import struct
import time
from collections.abc import AsyncGenerator, Callable

from pydantic import BaseModel

from lmforge.runtime import openai_protocol as proto
from lmforge.runtime.async_engine import (
    EngineDeadError,
    EngineNotReadyError,
    QueueFullError,
    RequestAbortedError,
)
from lmforge.runtime.openai_requests import APIError, Prepared, bad_request
from lmforge.runtime.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestOutput
from lmforge.runtime.tool_parsers import (
    NamedToolParser,
    RequiredToolParser,
    ToolCallStreamer,
    ToolParser,
    get_tool_parser,
    new_call_id,
)

MIN_LOGPROB = -9999.0  # what JSON gets instead of -inf (JSON has no infinities)
SSE_DONE = "data: [DONE]\n\n"

TokenStr = Callable[[int], str]  # token id -> its text alone (the server caches these)
OutputStream = AsyncGenerator[tuple[int, RequestOutput], None]  # (prompt index, cumulative output)


# Line breaks to Unicode but not to JSON: line-based SSE readers (httpx iter_lines, str.splitlines)
# would split an event inside a string there. JSON may escape any character, so they travel escaped.
_SSE_UNSAFE = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def sse(payload: BaseModel | dict, event: str | None = None) -> str:
    """One server-sent event (`event:` line for the Responses API's typed events)."""
    data = (
        payload.model_dump_json()
        if isinstance(payload, BaseModel)
        else json.dumps(payload, ensure_ascii=False)
    )
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {data.translate(_SSE_UNSAFE)}\n\n"


def finite(x: float | None) -> float:
    """A logprob JSON can carry: None, NaN and anything below MIN_LOGPROB (-inf) become MIN_LOGPROB."""
    if x is None or x != x or x < MIN_LOGPROB:
        return MIN_LOGPROB
    return float(x)


def usage(prepared: Prepared, finals: dict[int, RequestOutput]) -> proto.UsageInfo:
    """Prompt tokens of every prompt (each counted once, whatever n) and every generated token (none
    for echo with max_tokens=0: the token the engine ran for is not returned)."""
    prompt = sum(len(ids) for ids in prepared.prompt_ids)
    completion = (
        0 if prepared.echo_only else sum(len(c.token_ids) for out in finals.values() for c in out.outputs)
    )
    return proto.UsageInfo(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def choice_index(prompt_index: int, c: CompletionOutput, n: int) -> int:
    """Completions number choices across prompts: prompt i's samples are i*n .. i*n + n-1."""
    return prompt_index * n + c.index


def completion_logprobs(
    token_str: TokenStr,
    c: CompletionOutput,
    start: int,
    end: int,
    k: int,
    offset: int,
    result: proto.CompletionLogprobs | None = None,
) -> proto.CompletionLogprobs:
    """Tokens [start, end) of `c` (appended to `result` when given); text offsets start at `offset`.
    The top-k map always holds the sampled token too (OpenAI's legacy shape), so it can have k+1
    entries."""
    result = proto.CompletionLogprobs() if result is None else result
    for token_id, dist in zip(c.token_ids[start:end], (c.logprobs or [])[start:end], strict=False):
        offset = _add_legacy_logprob(result, token_str, token_id, dist, k, offset)
    return result


def prompt_completion_logprobs(token_str: TokenStr, out: RequestOutput, k: int) -> proto.CompletionLogprobs:
    """The echoed prompt's tokens, text offsets from 0. The first token has no logprob: null, with
    null top_logprobs (OpenAI's legacy API and vLLM)."""
    result, offset = proto.CompletionLogprobs(), 0
    for token_id, entry in zip(out.prompt_token_ids, out.prompt_logprobs or [], strict=False):
        dist = None if entry is None else {t: lp.logprob for t, lp in entry.items()}
        offset = _add_legacy_logprob(result, token_str, token_id, dist, k, offset)
    return result


def _add_legacy_logprob(
    result: proto.CompletionLogprobs,
    token_str: TokenStr,
    token_id: int,
    dist: dict[int, float] | None,
    k: int,
    offset: int,
) -> int:
    """Appends one token; returns the next token's text offset."""
    token = token_str(token_id)
    result.tokens.append(token)
    result.text_offset.append(offset)
    if dist is None:
        result.token_logprobs.append(None)
        result.top_logprobs.append(None)
        return offset + len(token)
    result.token_logprobs.append(finite(dist.get(token_id)))
    top = sorted(dist.items(), key=lambda kv: -kv[1])[:k]
    if token_id not in dict(top) and token_id in dist:
        top.append((token_id, dist[token_id]))
    result.top_logprobs.append({token_str(t): finite(v) for t, v in top})
    return offset + len(token)


def prompt_logprobs_body(prompt_logprobs: PromptLogprobs | None) -> proto.PromptLogprobs | None:
    """vLLM's `prompt_logprobs` field: {token id: {logprob, rank, decoded_token}} per prompt token
    after the first; -inf becomes MIN_LOGPROB."""
    if prompt_logprobs is None:
        return None
    return [
        None if entry is None else {t: _prompt_logprob(lp) for t, lp in entry.items()}
        for entry in prompt_logprobs
    ]


def _prompt_logprob(lp: Logprob) -> proto.PromptLogprob:
    return proto.PromptLogprob(logprob=finite(lp.logprob), rank=lp.rank, decoded_token=lp.decoded_token)


def chat_logprobs(
    token_str: TokenStr, c: CompletionOutput, start: int, end: int, k: int
) -> proto.ChatChoiceLogprobs:
    """Tokens [start, end) of `c` in the chat shape: exactly the top k alternatives, with UTF-8 bytes."""
    content = []
    for token_id, dist in zip(c.token_ids[start:end], (c.logprobs or [])[start:end], strict=False):
        token = token_str(token_id)
        top = sorted(dist.items(), key=lambda kv: -kv[1])[:k]
        content.append(
            proto.ChatLogprobEntry(
                token=token,
                logprob=finite(dist.get(token_id)),
                bytes=list(token.encode()),
                top_logprobs=[
                    proto.ChatLogprob(token=(s := token_str(t)), logprob=finite(v), bytes=list(s.encode()))
                    for t, v in top
                ],
            )
        )
    return proto.ChatChoiceLogprobs(content=content)


# --- whole responses -------------------------------------------------------------------------------


def completion_response(
    req: proto.CompletionRequest,
    prepared: Prepared,
    response_id: str,
    finals: dict[int, RequestOutput],
    token_str: TokenStr,
) -> proto.CompletionResponse:
    choices = []
    for i in sorted(finals):
        out = finals[i]
        prompt_logprobs = prompt_logprobs_body(out.prompt_logprobs)
        for c in out.outputs:
            prefix = prepared.prompt_texts[i] if req.echo else ""
            logprobs = None
            if req.logprobs is not None:
                logprobs = prompt_completion_logprobs(token_str, out, req.logprobs) if req.echo else None
                if not prepared.echo_only:
                    logprobs = completion_logprobs(
                        token_str, c, 0, len(c.token_ids), req.logprobs, len(prefix), logprobs
                    )
            choices.append(
                proto.CompletionChoice(
                    index=choice_index(i, c, req.n),
                    text=prefix if prepared.echo_only else prefix + c.text,
                    logprobs=logprobs,
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                    prompt_logprobs=prompt_logprobs,
                )
            )
    choices.sort(key=lambda ch: ch.index)
    return proto.CompletionResponse(
        id=response_id, model=prepared.model, choices=choices, usage=usage(prepared, finals)
    )


def tool_parser_for(prepared: Prepared) -> ToolParser | None:
    mode = prepared.tool_mode
    if mode.choice == "none":
        return None
    if mode.choice == "named":
        assert mode.function_name is not None  # a "named" mode always names its function
        return NamedToolParser(mode.function_name)
    if mode.choice == "required":
        return RequiredToolParser()
    assert mode.parser is not None  # "auto" is chosen only with a --tool-call-parser
    return get_tool_parser(mode.parser)


def tool_finish_reason(prepared: Prepared, finish_reason: str | None, num_calls: int) -> str | None:
    """OpenAI: "tool_calls" when the model chose to call tools; a forced named call ends "stop"."""
    if num_calls and finish_reason == "stop" and prepared.tool_mode.choice in ("auto", "required"):
        return "tool_calls"
    return finish_reason


def chat_message(prepared: Prepared, text: str) -> proto.ChatResponseMessage:
    """The assistant message: plain content, or content + tool calls read by the request's parser."""
    parser = tool_parser_for(prepared)
    if parser is None:
        return proto.ChatResponseMessage(content=text)
    parsed = parser.parse(text, final=True)
    calls = [
        proto.ToolCall(id=new_call_id(), function=proto.FunctionCall(name=c.name, arguments=c.arguments))
        for c in parsed.calls
        if c.name is not None
    ]
    if not prepared.tool_mode.parallel:
        calls = calls[:1]
    return proto.ChatResponseMessage(content=parsed.content or None, tool_calls=calls)


def chat_response(
    req: proto.ChatCompletionRequest,
    prepared: Prepared,
    response_id: str,
    finals: dict[int, RequestOutput],
    token_str: TokenStr,
) -> proto.ChatCompletionResponse:
    k = req.num_logprobs()
    choices = []
    for out in finals.values():
        for c in out.outputs:
            message = chat_message(prepared, c.text)
            choices.append(
                proto.ChatCompletionChoice(
                    index=c.index,
                    message=message,
                    logprobs=None if k is None else chat_logprobs(token_str, c, 0, len(c.token_ids), k),
                    finish_reason=tool_finish_reason(prepared, c.finish_reason, len(message.tool_calls)),
                    stop_reason=c.stop_reason,
                )
            )
    choices.sort(key=lambda ch: ch.index)
    return proto.ChatCompletionResponse(
        id=response_id,
        model=prepared.model,
        choices=choices,
        usage=usage(prepared, finals),
        prompt_logprobs=prompt_logprobs_body(finals[0].prompt_logprobs),
    )


def embedding_response(
    req: proto.EmbeddingRequest, prepared: Prepared, finals: dict[int, RequestOutput]
) -> proto.EmbeddingResponse:
    data = []
    for i in sorted(finals):
        vector = finals[i].embedding
        if vector is None:  # the engine was not started with task "embed"
            raise APIError(500, "the engine returned no embedding", "internal_error")
        encoded = (
            base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            if req.encoding_format == "base64"
            else vector
        )
        data.append(proto.EmbeddingData(index=i, embedding=encoded))
    num_tokens = sum(len(ids) for ids in prepared.prompt_ids)
    return proto.EmbeddingResponse(
        model=prepared.model,
        data=data,
        usage=proto.EmbeddingUsage(prompt_tokens=num_tokens, total_tokens=num_tokens),
    )


# --- streams ---------------------------------------------------------------------------------------


class StreamCursor:
    """Per choice: how much text/tokens were already sent (outputs are cumulative)."""

    __slots__ = ("text_sent", "tokens_sent", "finished")

    def __init__(self) -> None:
        self.text_sent, self.tokens_sent, self.finished = 0, 0, False

    def take(self, c: CompletionOutput, holdback: int) -> tuple[str, int, int]:
        """(new text, first new token, end token). Holds back `holdback` chars while running so a
        stop string split across steps is never sent before the engine truncates it."""
        end = len(c.text) if c.finished else max(self.text_sent, len(c.text) - holdback)
        delta = c.text[self.text_sent : end]
        self.text_sent = max(self.text_sent, end)
        start, self.tokens_sent = self.tokens_sent, len(c.token_ids)
        self.finished = c.finished
        return delta, start, len(c.token_ids)


def holdback(req: proto.SamplingFields) -> int:
    """Characters a running stream withholds: one less than the longest stop string (a prefix that
    long may still turn into a stop string the engine cuts off)."""
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    return max((len(s) for s in stops), default=1) - 1


def _usage_flags(req: proto.SamplingFields) -> tuple[bool, bool]:
    """(a final usage-only chunk, usage on every chunk)."""
    options = req.stream_options
    include_usage = bool(options and options.include_usage)
    return include_usage, bool(options and include_usage and options.continuous_usage_stats)


async def completion_stream(
    req: proto.CompletionRequest,
    prepared: Prepared,
    response_id: str,
    stream: OutputStream,
    token_str: TokenStr,
) -> AsyncGenerator[str, None]:
    """SSE events of a streamed completion, ending with `data: [DONE]`. With echo, each choice's
    first chunk starts with its prompt text."""
    created, hold = int(time.time()), holdback(req)
    include_usage, continuous = _usage_flags(req)
    cursors: dict[int, StreamCursor] = {}
    finals: dict[int, RequestOutput] = {}
    async for i, out in stream:
        finals[i] = out
        choices = []
        for c in out.outputs:
            index = choice_index(i, c, req.n)
            cursor = cursors.get(index)
            echo_now = cursor is None and req.echo  # the choice's first chunk carries the prompt
            if cursor is None:
                cursor = cursors[index] = StreamCursor()
            prefix = prepared.prompt_texts[i] if echo_now else ""
            if cursor.finished:
                continue
            delta, start, end = cursor.take(c, hold)
            if prepared.echo_only:  # the prompt alone: the generated token is dropped
                delta, start, end = "", 0, 0
            if not delta and not echo_now and start == end and not c.finished:
                continue
            logprobs = None
            if req.logprobs is not None:
                logprobs = prompt_completion_logprobs(token_str, out, req.logprobs) if echo_now else None
                logprobs = completion_logprobs(token_str, c, start, end, req.logprobs, len(prefix), logprobs)
            choices.append(
                proto.CompletionChoice(
                    index=index,
                    text=prefix + delta,
                    logprobs=logprobs,
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                )
            )
        if choices:
            yield sse(
                proto.CompletionResponse(
                    id=response_id,
                    created=created,
                    model=prepared.model,
                    choices=choices,
                    usage=usage(prepared, finals) if continuous else None,
                )
            )
    if include_usage:
        yield sse(
            proto.CompletionResponse(
                id=response_id,
                created=created,
                model=prepared.model,
                choices=[],
                usage=usage(prepared, finals),
            )
        )
    yield SSE_DONE


async def chat_stream(
    req: proto.ChatCompletionRequest,
    prepared: Prepared,
    response_id: str,
    stream: OutputStream,
    token_str: TokenStr,
) -> AsyncGenerator[str, None]:
    """SSE events of a streamed chat completion: a role chunk per choice first (as OpenAI), then
    content deltas, ending with `data: [DONE]`."""
    created, hold, k = int(time.time()), holdback(req), req.num_logprobs()
    include_usage, continuous = _usage_flags(req)
    cursors: dict[int, StreamCursor] = {}
    finals: dict[int, RequestOutput] = {}

    def chunk(choices: list[proto.ChatStreamChoice]) -> str:
        return sse(
            proto.ChatCompletionChunk(
                id=response_id,
                created=created,
                model=prepared.model,
                choices=choices,
                usage=usage(prepared, finals) if continuous else None,
            )
        )

    yield chunk(
        [
            proto.ChatStreamChoice(index=i, delta=proto.DeltaMessage(role="assistant", content=""))
            for i in range(req.n)
        ]
    )
    tools: dict[int, ToolCallStreamer] = {}
    async for _, out in stream:
        finals[0] = out
        choices = []
        for c in out.outputs:
            cursor = cursors.setdefault(c.index, StreamCursor())
            if cursor.finished:
                continue
            delta, start, end = cursor.take(c, hold)
            if not delta and start == end and not c.finished:
                continue
            message, finish_reason = proto.DeltaMessage(content=delta or None), c.finish_reason
            parser = tool_parser_for(prepared)
            if parser is not None:  # the text goes through the parser: content and call deltas
                streamer = tools.setdefault(c.index, ToolCallStreamer(parser))
                message, finish_reason = _tool_call_delta(streamer, prepared, c, cursor.text_sent)
                if message.content is None and message.tool_calls is None and start == end and not c.finished:
                    continue
            choices.append(
                proto.ChatStreamChoice(
                    index=c.index,
                    delta=message,
                    logprobs=None if k is None else chat_logprobs(token_str, c, start, end, k),
                    finish_reason=finish_reason,
                    stop_reason=c.stop_reason,
                )
            )
        if choices:
            yield chunk(choices)
    if include_usage:
        yield sse(
            proto.ChatCompletionChunk(
                id=response_id,
                created=created,
                model=prepared.model,
                choices=[],
                usage=usage(prepared, finals),
            )
        )
    yield SSE_DONE


def _tool_call_delta(
    streamer: ToolCallStreamer, prepared: Prepared, c: CompletionOutput, text_sent: int
) -> tuple[proto.DeltaMessage, str | None]:
    """A streamed choice's delta (content and tool call deltas) and finish reason when its text goes
    through the tool parser; parallel_tool_calls=false keeps the first call only."""
    content, updates = streamer.feed(c.text[:text_sent], c.finished)
    if not prepared.tool_mode.parallel:
        updates = [u for u in updates if u.index == 0]
    calls = [
        proto.ToolCallDelta(
            index=u.index,
            id=u.id,
            type="function" if u.id else None,
            function=proto.FunctionCallDelta(name=u.name, arguments=u.arguments),
        )
        for u in updates
    ]
    message = proto.DeltaMessage(content=content or None, tool_calls=calls or None)
    return message, tool_finish_reason(prepared, c.finish_reason, streamer.num_calls)


# --- engine failures -------------------------------------------------------------------------------


def engine_error(exc: BaseException) -> APIError:
    """An engine refusal or failure as the OpenAI error a client can act on: 429 retry later, 503
    the server is going away, 400 the engine rejected the request itself."""
    if isinstance(exc, QueueFullError):
        return APIError(429, f"Too many requests waiting: {exc}", "rate_limit_error", None, "queue_full")
    if isinstance(exc, EngineNotReadyError):
        return APIError(503, f"The engine is not accepting requests ({exc}).", "service_unavailable")
    if isinstance(exc, EngineDeadError | RequestAbortedError):
        return APIError(503, str(exc), "service_unavailable")
    if isinstance(exc, ValueError):
        return bad_request(str(exc))
    return APIError(500, f"internal error: {exc}", "internal_error")


async def with_error_event(
    body: AsyncGenerator[str, None], stream: AsyncGenerator[object, None]
) -> AsyncGenerator[str, None]:
    """An engine failure mid-stream becomes an error event (headers are already sent). Closing
    this closes `body` and `stream` (and so aborts the engine requests) right away, not at GC."""
    try:
        async with contextlib.aclosing(stream), contextlib.aclosing(body):
            async for event in body:
                yield event
    except (RequestAbortedError, EngineDeadError) as exc:
        err = engine_error(exc)
        yield sse(
            proto.ErrorResponse(error=proto.ErrorInfo(message=err.message, type=err.type, code=err.status))
        )
        yield SSE_DONE
