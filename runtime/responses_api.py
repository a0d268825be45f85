"""POST /v1/responses (OpenAI's Responses API) on top of chat completions: text and function tools.

A Responses request is rewritten into a ChatCompletionRequest (instructions -> a system message,
function_call / function_call_output items -> assistant tool_calls / tool messages, text.format ->
response_format) and served by the same engine path; the chat result becomes `output` items
(a message with output_text, function_call items). Streams send the typed events the openai SDK
reads (response.created ... response.completed), each with a sequence_number.

Stateless: nothing is stored, so previous_response_id, store=true, background and the other
fields listed in REFUSED answer 400 naming the field.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from typing import Any, Literal

from pydantic import BaseModel, Field

from lmforge.runtime import openai_protocol as proto
from lmforge.runtime.async_engine import EngineDeadError, RequestAbortedError
from lmforge.runtime.openai_requests import Prepared, bad_request
from lmforge.runtime.openai_responses import (
    OutputStream,
    StreamCursor,
    chat_message,
    engine_error,
    sse,
    tool_parser_for,
)
from lmforge.runtime.outputs import RequestOutput
from lmforge.runtime.tool_parsers import ToolCallStreamer, ToolCallUpdate

# Fields whose meaning needs server state or features this server does not have.
REFUSED = (
    "previous_response_id",
    "background",
    "reasoning",
    "conversation",
    "prompt",
    "max_tool_calls",
    "top_logprobs",
)


class ResponseTool(proto.OpenAIModel):
    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponseToolChoice(proto.OpenAIModel):
    type: Literal["function"]
    name: str


class TextFormat(proto.OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(proto.OpenAIModel):
    format: TextFormat | None = None


class ResponsesRequest(proto.OpenAIModel):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[ResponseTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ResponseToolChoice | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: proto.FiniteFloat | None = Field(None, ge=0.0, le=2.0)
    top_p: proto.FiniteFloat | None = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    text: TextConfig | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None  # echoed back
    include: list[str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    user: str | None = None
    previous_response_id: Any = None
    background: Any = None
    reasoning: Any = None
    conversation: Any = None
    prompt: Any = None
    max_tool_calls: Any = None
    top_logprobs: Any = None


def _item_text(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request("content must be a string or a list of text parts", param)
    parts = []
    for j, part in enumerate(content):
        if (
            not isinstance(part, dict)
            or part.get("type") not in ("input_text", "output_text", "text")
            or not isinstance(part.get("text"), str)
        ):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise bad_request(
                f"content part type {kind!r} is not supported: only text parts are served",
                f"{param}.{j}.type",
            )
        parts.append(part["text"])
    return "\n".join(parts)


def to_chat_request(req: ResponsesRequest) -> proto.ChatCompletionRequest:
    """The equivalent chat request; every field that does not map is refused by name."""
    _refuse_unmapped(req)
    messages: list[dict[str, Any]] = (
        [{"role": "system", "content": req.instructions}] if req.instructions else []
    )
    items = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    if not items:
        raise bad_request("input must not be empty", "input")
    for i, item in enumerate(items):
        _append_item(messages, item, i)
    tool_choice: str | dict[str, Any] | None = (
        {"type": "function", "function": {"name": req.tool_choice.name}}
        if isinstance(req.tool_choice, ResponseToolChoice)
        else req.tool_choice
    )
    tools, response_format = _chat_tools(req.tools), _response_format(req)
    try:
        return proto.ChatCompletionRequest(
            model=req.model,
            messages=messages,
            tools=tools,
            tool_choice=tool_choice,
            parallel_tool_calls=req.parallel_tool_calls,
            max_completion_tokens=req.max_output_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            response_format=response_format,
            user=req.user,
        )
    except ValueError as exc:  # pydantic: a malformed item (e.g. a function_call without its name)
        raise bad_request(f"input could not be read: {exc}", "input") from None


def _refuse_unmapped(req: ResponsesRequest) -> None:
    for name in REFUSED:
        if getattr(req, name) is not None:
            raise bad_request(
                f"{name} is not supported (this server stores no responses and has no "
                "reasoning or prompt templates)",
                name,
            )
    if req.store:
        raise bad_request("store=true is not supported: responses are not stored", "store")
    if req.include:
        raise bad_request(f"include {req.include} is not supported", "include")
    if req.truncation == "auto":
        raise bad_request("truncation 'auto' is not supported (a prompt too long is a 400)", "truncation")


def _append_item(messages: list[dict[str, Any]], item: dict[str, Any], i: int) -> None:
    """One input item as chat messages: a message, a function call (parallel calls join one assistant
    turn) or a function call's output (a tool message)."""
    kind = item.get("type", "message")
    if kind == "message":
        if item.get("role") not in ("user", "system", "developer", "assistant"):
            raise bad_request(f"role {item.get('role')!r} is not supported", f"input.{i}.role")
        messages.append(
            {"role": item["role"], "content": _item_text(item.get("content"), f"input.{i}.content")}
        )
    elif kind == "function_call":
        call = {
            "id": item.get("call_id"),
            "type": "function",
            "function": {"name": item.get("name"), "arguments": item.get("arguments")},
        }
        if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls"):
            messages[-1]["tool_calls"].append(call)  # parallel calls: one assistant turn
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        output = item.get("output")
        messages.append(
            {
                "role": "tool",
                "tool_call_id": item.get("call_id"),
                "content": output if isinstance(output, str) else _item_text(output, f"input.{i}.output"),
            }
        )
    else:
        raise bad_request(
            f"input item type {kind!r} is not supported (message, function_call, function_call_output are)",
            f"input.{i}.type",
        )


def _chat_tools(tools: list[ResponseTool] | None) -> list[dict[str, Any]] | None:
    if not tools:
        return None
    for i, tool in enumerate(tools):
        if tool.type != "function" or not tool.name:
            raise bad_request(
                f"tool type {tool.type!r} is not supported: only named function tools are served",
                f"tools.{i}.type",
            )
    return [
        {
            "type": "function",
            "function": {
                "name": t.name,
                "description": t.description,
                "parameters": t.parameters,
                "strict": t.strict,
            },
        }
        for t in tools
    ]


def _response_format(req: ResponsesRequest) -> dict[str, Any] | None:
    """text.format as chat's response_format (None for plain text)."""
    fmt = req.text.format if req.text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    response_format: dict[str, Any] = {"type": fmt.type}
    if fmt.type == "json_schema":
        response_format["json_schema"] = {"name": fmt.name, "schema": fmt.schema_, "strict": fmt.strict}
    return response_format


# --- output ------------------------------------------------------------------------------------------


def _usage(prepared: Prepared, out: RequestOutput | None) -> dict[str, Any]:
    prompt = sum(len(ids) for ids in prepared.prompt_ids)
    completion = sum(len(c.token_ids) for c in out.outputs) if out is not None else 0
    cached = out.num_cached_tokens if out is not None else 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def _call_item(call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": call_id.replace("call_", "fc_", 1),
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def response_body(
    req: ResponsesRequest,
    prepared: Prepared,
    response_id: str,
    created: int,
    status: str,
    output: list[dict[str, Any]],
    out: RequestOutput | None,
) -> dict[str, Any]:
    incomplete = None
    if out is not None and out.outputs and out.outputs[0].finish_reason == "length":
        status, incomplete = "incomplete", {"reason": "max_output_tokens"}
    tool_choice = (
        req.tool_choice.model_dump()
        if isinstance(req.tool_choice, BaseModel)
        else (req.tool_choice or "auto")
    )
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": status,
        "model": prepared.model,
        "output": output,
        "error": None,
        "incomplete_details": incomplete,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "metadata": req.metadata or {},
        "parallel_tool_calls": prepared.tool_mode.parallel,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "tool_choice": tool_choice,
        "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
        "text": req.text.model_dump(by_alias=True, exclude_none=True)
        if req.text
        else {"format": {"type": "text"}},
        "store": False,
        "truncation": "disabled",
        "usage": _usage(prepared, out) if status != "in_progress" else None,
    }


def final_response(
    req: ResponsesRequest, prepared: Prepared, response_id: str, out: RequestOutput
) -> dict[str, Any]:
    message = chat_message(prepared, out.outputs[0].text)
    output = []
    if message.content:
        output.append(_message_item(proto.random_id("msg"), message.content, "completed"))
    output += [
        _call_item(c.id, c.function.name, c.function.arguments, "completed") for c in message.tool_calls
    ]
    return response_body(req, prepared, response_id, int(time.time()), "completed", output, out)


class _EventWriter:
    def __init__(self) -> None:
        self.sequence_number = 0

    def __call__(self, kind: str, **fields: Any) -> str:
        event = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return sse(event, event=kind)


def _call_events(
    updates: list[ToolCallUpdate],
    calls: dict[int, dict[str, Any]],
    output: list[dict[str, Any]],
    emit: _EventWriter,
    parallel: bool,
) -> list[str]:
    """This step's tool call events: a function_call item (added to `calls` and `output`) when a call
    starts, then its argument deltas; parallel=False keeps the first call only."""
    events = []
    for u in updates:
        if not parallel and u.index > 0:
            continue
        if u.id is not None:
            assert u.name is not None  # a call's first update carries its id and name
            item = calls[u.index] = _call_item(u.id, u.name, "", "in_progress")
            output.append(item)
            events.append(emit("response.output_item.added", output_index=len(output) - 1, item=item))
        item = calls[u.index]
        if u.arguments:
            item["arguments"] += u.arguments
            events.append(
                emit(
                    "response.function_call_arguments.delta",
                    item_id=item["id"],
                    output_index=output.index(item),
                    delta=u.arguments,
                )
            )
    return events


async def response_stream(
    req: ResponsesRequest, prepared: Prepared, response_id: str, stream: OutputStream
) -> AsyncGenerator[str, None]:
    """The Responses API's typed SSE events for one generation: text deltas in a message item,
    each tool call its own function_call item with argument deltas; an engine failure after the
    headers went out is an `error` event, then `response.failed`."""
    created, emit = int(time.time()), _EventWriter()
    yield emit(
        "response.created",
        response=response_body(req, prepared, response_id, created, "in_progress", [], None),
    )
    yield emit(
        "response.in_progress",
        response=response_body(req, prepared, response_id, created, "in_progress", [], None),
    )
    parser = tool_parser_for(prepared)
    streamer = ToolCallStreamer(parser) if parser is not None else None
    cursor, output, last = StreamCursor(), [], None
    message: dict[str, Any] | None = None  # the open message item
    calls: dict[int, dict[str, Any]] = {}  # call index -> its function_call item
    text = ""
    try:
        async for _, out in stream:
            last = out
            c = out.outputs[0]
            delta, _, _ = cursor.take(c, 0)
            updates: list[ToolCallUpdate] = []
            if streamer is not None:
                delta, updates = streamer.feed(c.text[: cursor.text_sent], c.finished)
            if delta:
                if message is None:
                    message = _message_item(proto.random_id("msg"), "", "in_progress")
                    message["content"] = []
                    output.append(message)
                    yield emit("response.output_item.added", output_index=len(output) - 1, item=message)
                    message["content"] = [
                        {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                    ]
                    yield emit(
                        "response.content_part.added",
                        item_id=message["id"],
                        output_index=len(output) - 1,
                        content_index=0,
                        part=message["content"][0],
                    )
                text += delta
                yield emit(
                    "response.output_text.delta",
                    item_id=message["id"],
                    output_index=output.index(message),
                    content_index=0,
                    delta=delta,
                    logprobs=[],
                )
            for event in _call_events(updates, calls, output, emit, prepared.tool_mode.parallel):
                yield event
    except (RequestAbortedError, EngineDeadError) as exc:  # headers are sent: the failure is an event
        err = engine_error(exc)
        yield emit("error", code=err.type, message=err.message, param=None)
        body = response_body(req, prepared, response_id, created, "failed", output, last)
        yield emit("response.failed", response={**body, "error": {"code": err.type, "message": err.message}})
        return
    if message is not None:
        index = output.index(message)
        part = message["content"][0]
        part["text"] = text
        yield emit(
            "response.output_text.done",
            item_id=message["id"],
            output_index=index,
            content_index=0,
            text=text,
            logprobs=[],
        )
        yield emit(
            "response.content_part.done",
            item_id=message["id"],
            output_index=index,
            content_index=0,
            part=part,
        )
        message["status"] = "completed"
        yield emit("response.output_item.done", output_index=index, item=message)
    for item in calls.values():
        index = output.index(item)
        yield emit(
            "response.function_call_arguments.done",
            item_id=item["id"],
            output_index=index,
            name=item["name"],
            arguments=item["arguments"],
        )
        item["status"] = "completed"
        yield emit("response.output_item.done", output_index=index, item=item)
    body = response_body(req, prepared, response_id, created, "completed", output, last)
    yield emit(
        "response.incomplete" if body["status"] == "incomplete" else "response.completed", response=body
    )
