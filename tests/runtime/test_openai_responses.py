"""openai_responses on CPU, no model: bodies and SSE chunks built from hand-made engine outputs.
Stream == non-stream equality through a real server is in test_server.py; these pin the edges."""

from __future__ import annotations

import asyncio
import json
import math

import pytest

from lmforge.runtime import openai_protocol as proto
from lmforge.runtime.async_engine import EngineDeadError, QueueFullError
from lmforge.runtime.openai_requests import Prepared
from lmforge.runtime.openai_responses import (
    MIN_LOGPROB,
    SSE_DONE,
    StreamCursor,
    chat_logprobs,
    chat_response,
    chat_stream,
    completion_logprobs,
    completion_response,
    completion_stream,
    engine_error,
    finite,
    holdback,
    prompt_completion_logprobs,
    prompt_logprobs_body,
    with_error_event,
)
from lmforge.runtime.outputs import CompletionOutput, Logprob, RequestOutput
from lmforge.runtime.sampling_params import SamplingParams

TOKENS = {5: "a", 6: "bc", 7: "é"}


def token_str(token_id: int) -> str:
    return TOKENS[token_id]


def output(
    text: str,
    token_ids: list[int],
    finish_reason: str | None = None,
    index: int = 0,
    logprobs: list[dict[int, float]] | None = None,
) -> CompletionOutput:
    return CompletionOutput(
        index=index, text=text, token_ids=token_ids, logprobs=logprobs, finish_reason=finish_reason
    )


def request_output(*outputs: CompletionOutput) -> RequestOutput:
    return RequestOutput("r", None, [1, 2], list(outputs), finished=all(c.finished for c in outputs))


def scored_output(*outputs: CompletionOutput) -> RequestOutput:
    """Prompt [5, 6, 7] with prompt logprobs (k=1): 6 was the top token, 7 was not."""
    prompt_logprobs = [
        None,
        {6: Logprob(-0.5, 1, "bc"), 5: Logprob(-1.5, 2, "a")},
        {7: Logprob(-math.inf, 9, "é"), 5: Logprob(-0.25, 1, "a")},
    ]
    return RequestOutput(
        "r",
        None,
        [5, 6, 7],
        list(outputs),
        finished=all(c.finished for c in outputs),
        prompt_logprobs=prompt_logprobs,
    )


def prepared(prompt_ids: list[list[int]], texts: list[str] | None = None) -> Prepared:
    return Prepared(prompt_ids, texts or [""] * len(prompt_ids), SamplingParams(), "tiny")


async def _stream_of(items: list[tuple[int, RequestOutput]]):
    for item in items:
        yield item


def collect(events) -> list[dict | str]:
    async def main() -> list[str]:
        return [event async for event in events]

    return [e if e == SSE_DONE else json.loads(e.removeprefix("data: ")) for e in asyncio.run(main())]


# --- logprobs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x", "want"),
    [
        (-math.inf, MIN_LOGPROB),
        (math.nan, MIN_LOGPROB),
        (None, MIN_LOGPROB),
        (-1e6, MIN_LOGPROB),
        (-0.5, -0.5),
    ],
    ids=["-inf", "nan", "missing", "below-floor", "normal"],
)
def test_finite(x, want):
    assert finite(x) == want


def test_completion_logprobs_adds_the_sampled_token_outside_the_top_k():
    c = output("abc", [5, 6], logprobs=[{5: -0.1, 6: -2.0}, {5: -0.2, 6: -3.0, 7: -math.inf}])
    assert completion_logprobs(token_str, c, 0, 2, 1, 4) == proto.CompletionLogprobs(
        tokens=["a", "bc"],
        token_logprobs=[-0.1, -3.0],
        text_offset=[4, 5],
        top_logprobs=[{"a": -0.1}, {"a": -0.2, "bc": -3.0}],
    )


def test_chat_logprobs_has_exactly_k_alternatives_and_utf8_bytes():
    c = output("éa", [7, 5], logprobs=[{7: -1.0, 5: -0.5}, {5: -0.1}])
    got = chat_logprobs(token_str, c, 0, 1, 1).content
    assert [(e.token, e.logprob, e.bytes) for e in got] == [("é", -1.0, [0xC3, 0xA9])]
    assert [(t.token, t.logprob) for t in got[0].top_logprobs] == [("a", -0.5)]


def test_prompt_completion_logprobs_first_token_is_null():
    got = prompt_completion_logprobs(token_str, scored_output(), 1)
    assert got == proto.CompletionLogprobs(
        tokens=["a", "bc", "é"],
        token_logprobs=[None, -0.5, MIN_LOGPROB],
        text_offset=[0, 1, 3],
        top_logprobs=[None, {"bc": -0.5}, {"a": -0.25, "é": MIN_LOGPROB}],
    )


def test_prompt_logprobs_body_is_vllms_json():
    body = prompt_logprobs_body(scored_output().prompt_logprobs)
    assert json.loads(proto.CompletionChoice(index=0, text="", prompt_logprobs=body).model_dump_json())[
        "prompt_logprobs"
    ] == [
        None,
        {
            "6": {"logprob": -0.5, "rank": 1, "decoded_token": "bc"},
            "5": {"logprob": -1.5, "rank": 2, "decoded_token": "a"},
        },
        {
            "7": {"logprob": MIN_LOGPROB, "rank": 9, "decoded_token": "é"},
            "5": {"logprob": -0.25, "rank": 1, "decoded_token": "a"},
        },
    ]
    assert prompt_logprobs_body(None) is None


# --- whole responses --------------------------------------------------------------------------------


def test_completion_response_echo_with_logprobs_prompt_first():
    req = proto.CompletionRequest(prompt=[5, 6, 7], echo=True, logprobs=1)
    finals = {0: scored_output(output("a", [5], "length", logprobs=[{5: -0.1, 6: -3.0}]))}
    body = completion_response(req, prepared([[5, 6, 7]], ["abcé"]), "cmpl-1", finals, token_str)
    choice = body.choices[0]
    assert choice.text == "abcéa"
    assert choice.logprobs.tokens == ["a", "bc", "é", "a"]
    assert choice.logprobs.token_logprobs == [None, -0.5, MIN_LOGPROB, -0.1]
    assert choice.logprobs.top_logprobs[0] is None and choice.logprobs.top_logprobs[3] == {"a": -0.1}
    assert choice.logprobs.text_offset == [0, 1, 3, 4]
    assert len(choice.prompt_logprobs) == 3  # vLLM's field too
    assert body.usage.completion_tokens == 1


def test_completion_response_echo_only_drops_the_generated_token():
    req = proto.CompletionRequest(prompt=[5, 6, 7], echo=True, logprobs=1, max_tokens=0)
    finals = {0: scored_output(output("a", [5], "length", logprobs=[{5: -0.1}]))}
    echo_only = Prepared([[5, 6, 7]], ["abcé"], SamplingParams(max_tokens=1), "tiny", echo_only=True)
    body = completion_response(req, echo_only, "cmpl-1", finals, token_str)
    choice = body.choices[0]
    assert (choice.text, choice.finish_reason, choice.logprobs.tokens) == ("abcé", "length", ["a", "bc", "é"])
    assert body.usage == proto.UsageInfo(prompt_tokens=3, completion_tokens=0, total_tokens=3)
    events = collect(
        completion_stream(
            req.model_copy(update={"stream": True}),
            echo_only,
            "cmpl-1",
            _stream_of([(0, finals[0])]),
            token_str,
        )
    )
    assert [(c["choices"][0]["text"], c["choices"][0]["logprobs"]["tokens"]) for c in events[:-1]] == [
        ("abcé", ["a", "bc", "é"])
    ]


def test_completion_stream_echo_sends_the_prompt_logprobs_first():
    req = proto.CompletionRequest(prompt=[5, 6, 7], echo=True, logprobs=1, stream=True)
    outs = [
        (0, scored_output(output("a", [5], logprobs=[{5: -0.1}]))),
        (0, scored_output(output("abc", [5, 6], "length", logprobs=[{5: -0.1}, {6: -0.2}]))),
    ]
    events = collect(
        completion_stream(req, prepared([[5, 6, 7]], ["abcé"]), "cmpl-1", _stream_of(outs), token_str)
    )
    first, second = (e["choices"][0] for e in events[:-1])
    assert (first["text"], first["logprobs"]["token_logprobs"]) == ("abcéa", [None, -0.5, MIN_LOGPROB, -0.1])
    assert (second["text"], second["logprobs"]["token_logprobs"]) == ("bc", [-0.2])


def test_chat_response_carries_prompt_logprobs_once():
    req = proto.ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], prompt_logprobs=1)
    body = chat_response(
        req, prepared([[5, 6, 7]]), "chatcmpl-1", {0: scored_output(output("a", [5], "stop"))}, token_str
    )
    assert body.prompt_logprobs[0] is None and body.prompt_logprobs[1][6].rank == 1
    assert "prompt_logprobs" not in body.choices[0].model_dump()


def test_completion_response_numbers_choices_across_prompts_and_echoes():
    req = proto.CompletionRequest(prompt=["p0", "p1"], n=2, echo=True)
    finals = {
        1: request_output(output("y", [5, 5], "length", 1), output("x", [5], "stop", 0)),
        0: request_output(output("z", [6], "length", 0), output("w", [6, 6, 6], "length", 1)),
    }
    body = completion_response(req, prepared([[1, 2], [3]], ["p0", "p1"]), "cmpl-1", finals, token_str)
    assert [(ch.index, ch.text, ch.finish_reason) for ch in body.choices] == [
        (0, "p0z", "length"),
        (1, "p0w", "length"),
        (2, "p1x", "stop"),
        (3, "p1y", "length"),
    ]
    assert body.usage == proto.UsageInfo(prompt_tokens=3, completion_tokens=7, total_tokens=10)


# --- streams ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stop", "want"), [(None, 0), ("END", 2), (["x", "four"], 3)], ids=["none", "str", "list"]
)
def test_holdback(stop, want):
    assert holdback(proto.CompletionRequest(prompt="p", stop=stop)) == want


def test_stream_cursor_withholds_a_possible_stop_prefix_until_finished():
    cursor = StreamCursor()
    assert cursor.take(output("hello", [5, 5]), 3) == ("he", 0, 2)
    assert cursor.take(output("hel", [5, 5, 5]), 3) == ("", 2, 3)  # never shrinks what was sent
    assert cursor.take(output("hello wor", [5] * 4, "stop"), 3) == ("llo wor", 3, 4)
    assert cursor.finished


def test_completion_stream_echo_once_continuous_usage_and_final_usage_chunk():
    req = proto.CompletionRequest(
        prompt="hi",
        echo=True,
        stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
    )
    outs = [
        (0, request_output(output("", []))),
        (0, request_output(output("ab", [5, 5]))),
        (0, request_output(output("ab", [5, 5]))),
        (0, request_output(output("abc", [5, 5, 6], "length"))),
    ]
    events = collect(
        completion_stream(req, prepared([[1, 2]], ["hi"]), "cmpl-1", _stream_of(outs), token_str)
    )
    *chunks, final, done = events
    assert [
        (c["choices"][0]["text"], c["choices"][0]["finish_reason"], c["usage"]["completion_tokens"])
        for c in chunks
    ] == [("hi", None, 0), ("ab", None, 2), ("c", "length", 3)]  # no empty chunk
    assert (final["choices"], final["usage"]["total_tokens"], done) == ([], 5, SSE_DONE)


def test_chat_stream_opens_with_a_role_chunk_per_choice():
    req = proto.ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], n=2, stream=True)
    outs = [
        (0, request_output(output("a", [5], index=0), output("", [], index=1))),
        (0, request_output(output("a", [5], "length", 0), output("bc", [6], "stop", 1))),
    ]
    events = collect(chat_stream(req, prepared([[1]]), "chatcmpl-1", _stream_of(outs), token_str))
    assert [
        [(ch["index"], ch["delta"], ch["finish_reason"]) for ch in e["choices"]] for e in events[:-1]
    ] == [
        [(0, {"role": "assistant", "content": ""}, None), (1, {"role": "assistant", "content": ""}, None)],
        [(0, {"content": "a"}, None)],
        [(0, {}, "length"), (1, {"content": "bc"}, "stop")],
    ]
    assert events[-1] == SSE_DONE and all(e["usage"] is None for e in events[:-1])


# --- engine failures --------------------------------------------------------------------------------


def test_engine_error_statuses():
    assert [
        (e.status, e.type, e.code)
        for e in map(
            engine_error,
            [QueueFullError("8 waiting"), EngineDeadError("gone"), ValueError("too long"), RuntimeError("?")],
        )
    ] == [
        (429, "rate_limit_error", "queue_full"),
        (503, "service_unavailable", 503),
        (400, "invalid_request_error", 400),
        (500, "internal_error", 500),
    ]


async def _body(stream):
    async for _, out in stream:
        yield f"data: {json.dumps({'text': out.outputs[0].text})}\n\n"


def test_engine_death_mid_stream_becomes_an_error_event():
    async def engine_stream():
        yield 0, request_output(output("a", [5]))
        raise EngineDeadError("engine thread died")

    stream = engine_stream()
    assert collect(with_error_event(_body(stream), stream)) == [
        {"text": "a"},
        {
            "error": {
                "message": "engine thread died",
                "type": "service_unavailable",
                "param": None,
                "code": 503,
            }
        },
        SSE_DONE,
    ]


def test_closing_the_events_closes_the_engine_stream_at_once():
    closed = []

    async def endless_engine_stream():
        try:
            while True:
                yield 0, request_output(output("a", [5]))
        finally:
            closed.append("engine stream")  # AsyncLLM aborts the request here

    async def main() -> tuple[str, list[str]]:
        stream = endless_engine_stream()
        events = with_error_event(_body(stream), stream)
        first = await anext(events)
        await events.aclose()  # what Starlette does when the client goes away
        return first, list(closed)  # now, not when asyncio.run finalizes leftover generators

    assert asyncio.run(main()) == ('data: {"text": "a"}\n\n', ["engine stream"])
