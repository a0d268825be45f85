"""Tool-call parsers on whole outputs and, character by character, on growing ones."""

from __future__ import annotations

import json

import pytest

from lmforge.runtime.tool_parsers import (
    NamedToolParser,
    RequiredToolParser,
    ToolCallStreamer,
    get_tool_parser,
)

WEATHER = {"city": "Paris", "unit": "c", "days": [1, 2]}
CASES = [
    (
        "hermes",
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": '
        + json.dumps(WEATHER)
        + '}\n</tool_call>\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>',
        "Let me check.",
        [("get_weather", WEATHER), ("now", {})],
    ),
    (
        "llama3_json",
        '<|python_tag|>{"name": "get_weather", "parameters": '
        + json.dumps(WEATHER)
        + '}; {"name": "now", "parameters": {}}',
        "",
        [("get_weather", WEATHER), ("now", {})],
    ),
    ("llama3_json", '{"parameters": {"x": 1}, "name": "f"}', "", [("f", {"x": 1})]),  # keys in any order
    (
        "mistral",
        'Sure [TOOL_CALLS][{"name": "get_weather", "arguments": ' + json.dumps(WEATHER) + "}, "
        '{"name": "now", "arguments": {}}]',
        "Sure",
        [("get_weather", WEATHER), ("now", {})],
    ),
    ("mistral", "[TOOL_CALLS]get_weather[ARGS]" + json.dumps(WEATHER), "", [("get_weather", WEATHER)]),
]


@pytest.mark.parametrize(
    ("parser", "text", "content", "calls"),
    CASES,
    ids=["hermes", "llama3", "llama3-key-order", "mistral-json", "mistral-args"],
)
def test_whole_output(parser, text, content, calls):
    parsed = get_tool_parser(parser).parse(text, final=True)
    assert parsed.content == content
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == calls


@pytest.mark.parametrize(
    ("parser", "text", "content", "calls"),
    CASES,
    ids=["hermes", "llama3", "llama3-key-order", "mistral-json", "mistral-args"],
)
def test_streamed_char_by_char_adds_up_to_the_whole(parser, text, content, calls):
    streamer = ToolCallStreamer(get_tool_parser(parser))
    sent_content, ids, names, args = "", [], [], []
    for end in range(1, len(text) + 1):
        delta, updates = streamer.feed(text[:end], final=end == len(text))
        sent_content += delta
        for u in updates:
            if u.id is not None:
                assert u.index == len(ids) and u.name is not None
                ids.append(u.id)
                names.append(u.name)
                args.append("")
            args[u.index] += u.arguments
    assert sent_content.strip() == content
    assert "<tool_call" not in sent_content and "[TOOL_CALLS" not in sent_content
    assert [(n, json.loads(a)) for n, a in zip(names, args, strict=True)] == calls
    assert len(set(ids)) == len(ids)


def test_plain_text_is_content_and_broken_calls_fall_back_to_text():
    for parser in ("hermes", "llama3_json", "mistral"):
        assert get_tool_parser(parser).parse("Hello there", final=True).content == "Hello there"
    broken = '<tool_call>{"name": "f", "arguments": {"x": </tool_call>'
    parsed = get_tool_parser("hermes").parse(broken, final=True)
    assert parsed.content == broken and parsed.calls == []


def test_required_and_named_formats():
    text = '[{"name": "a", "parameters": {"q": "x"}}, {"name": "b", "parameters": {}}]'
    calls = RequiredToolParser().parse(text, final=True).calls
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("a", {"q": "x"}), ("b", {})]
    (call,) = NamedToolParser("f").parse('{"q": 1}', final=True).calls
    assert (call.name, call.arguments, call.complete) == ("f", '{"q": 1}', True)


def test_unknown_parser_is_named():
    with pytest.raises(ValueError, match="'pythonic'.*hermes"):
        get_tool_parser("pythonic")
