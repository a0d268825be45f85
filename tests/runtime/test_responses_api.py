"""responses_api without a server: request mapping and the stream's failure events."""

from __future__ import annotations

import asyncio
import json

import pytest

from lmforge.runtime.async_engine import RequestAbortedError
from lmforge.runtime.openai_requests import APIError, Prepared
from lmforge.runtime.outputs import CompletionOutput, RequestOutput
from lmforge.runtime.responses_api import ResponsesRequest, response_stream, to_chat_request
from lmforge.runtime.sampling_params import SamplingParams


def test_items_become_chat_messages():
    req = ResponsesRequest(
        instructions="Be brief.",
        input=[
            {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
            {"type": "function_call", "call_id": "call_1", "name": "w", "arguments": "{}"},
            {"type": "function_call", "call_id": "call_2", "name": "w", "arguments": '{"a": 1}'},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        ],
        tools=[{"type": "function", "name": "w", "parameters": {"type": "object"}}],
        tool_choice={"type": "function", "name": "w"},
        max_output_tokens=7,
        text={"format": {"type": "json_schema", "name": "s", "schema": {"type": "object"}}},
    )
    chat = to_chat_request(req)
    assert [m.role for m in chat.messages] == ["system", "user", "assistant", "tool"]
    assert [c.id for c in chat.messages[2].tool_calls] == ["call_1", "call_2"]  # parallel calls: one turn
    assert chat.messages[3].tool_call_id == "call_1" and chat.messages[3].content == "sunny"
    assert chat.tool_choice.function.name == "w" and chat.max_completion_tokens == 7
    assert chat.response_format.json_schema.schema_ == {"type": "object"}
    with pytest.raises(APIError) as info:
        to_chat_request(ResponsesRequest(input="x", include=["reasoning.encrypted_content"]))
    assert info.value.param == "include"


def test_engine_failure_mid_stream_is_an_error_event_then_response_failed():
    async def stream():
        yield 0, RequestOutput("r", None, [1], [CompletionOutput(0, "Hel", [5, 6])])
        raise RequestAbortedError("engine step failed: boom")

    prepared = Prepared([[1, 2]], [""], SamplingParams(), "tiny")

    async def events():
        return [e async for e in response_stream(ResponsesRequest(input="x"), prepared, "resp_1", stream())]

    parsed = [json.loads(e.split("data: ", 1)[1]) for e in asyncio.run(events())]
    kinds = [e["type"] for e in parsed]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "error",
        "response.failed",
    ]
    assert parsed[4]["delta"] == "Hel" and "boom" in parsed[5]["message"]
    assert parsed[-1]["response"]["status"] == "failed" and parsed[-1]["sequence_number"] == 6
