"""Model text -> (content, tool calls), for whole outputs and for growing ones (streams).

One parser per output format, named as vLLM's `--tool-call-parser`:
  hermes       Hermes / Qwen 2.5 / Qwen 3: <tool_call>{"name": ..., "arguments": {...}}</tool_call> ...
  llama3_json  Llama 3.x: [<|python_tag|>]{"name": ..., "parameters": {...}}; more calls after "; "
  mistral      Mistral: [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...] or [TOOL_CALLS]name[ARGS]{...}
and two the server uses for tool_choice it enforces with a grammar (openai_requests.tool_mode):
  required     a JSON array [{"name": ..., "parameters": {...}}, ...] (vLLM's format for "required")
  named        the whole output is the arguments of the one named function

`parse(text, final)` is pure and re-run on the cumulative text each step: a call's `arguments` is
the raw JSON text of its arguments value, so while it grows every earlier value is a prefix of the
later one and `ToolCallStreamer` can send the difference as OpenAI's incremental deltas. Content is
held back while its tail could still start a tool-call marker.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

_DECODER = json.JSONDecoder()
_NAME = r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*'


@dataclass(slots=True)
class ParsedCall:
    name: str | None  # None until the name is complete
    arguments: str  # raw JSON text of the arguments so far ("" before they start)
    complete: bool = False


@dataclass(slots=True)
class ParsedOutput:
    content: str
    calls: list[ParsedCall] = field(default_factory=list)


def _held_back(text: str, marker: str) -> str:
    """`text` without a tail that is a proper prefix of `marker` (it may still become the marker)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return text[:-n]
    return text


def _call_at(text: str, start: int, args_keys: tuple[str, ...]) -> tuple[ParsedCall | None, int]:
    """The call object starting at text[start] ('{'): (call so far, index after it or -1 while
    incomplete). The arguments stream only when "name" comes first (what every format writes)."""
    try:
        obj, end = _DECODER.raw_decode(text, start)
    except json.JSONDecodeError:
        obj, end = None, -1
    head = re.compile(r"\{\s*" + _NAME + '"(?:' + "|".join(args_keys) + r')"\s*:\s*').match(text, start)
    if obj is not None:
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None, end
        key = next((k for k in args_keys if k in obj), None)
        if head is not None:
            _, value_end = _DECODER.raw_decode(text, head.end())
            arguments = text[head.end() : value_end]
        else:
            arguments = json.dumps(obj[key], ensure_ascii=False) if key else "{}"
        return ParsedCall(obj["name"], arguments, True), end
    if head is None:
        return ParsedCall(None, ""), -1
    name = json.loads(f'"{head.group(1)}"')
    try:
        _, value_end = _DECODER.raw_decode(text, head.end())
        return ParsedCall(name, text[head.end() : value_end]), -1
    except json.JSONDecodeError:
        return ParsedCall(name, text[head.end() :]), -1


def _skip(text: str, i: int, chars: str) -> int:
    while i < len(text) and (text[i].isspace() or text[i] in chars):
        i += 1
    return i


def _json_array(text: str, start: int, args_keys: tuple[str, ...]) -> tuple[list[ParsedCall], bool]:
    """Calls of a JSON array of call objects starting at text[start] ('['); (calls, ended with ']')."""
    calls: list[ParsedCall] = []
    i = _skip(text, start + 1, "")
    while i < len(text) and text[i] == "{":
        call, end = _call_at(text, i, args_keys)
        if call is None:
            return calls, False
        calls.append(call)
        if end < 0:
            return calls, False
        i = _skip(text, end, ",")
    return calls, i < len(text) and text[i] == "]"


def _all_complete(calls: list[ParsedCall]) -> bool:
    return bool(calls) and all(c.complete for c in calls)


class ToolParser:
    name = ""

    def parse(self, text: str, final: bool) -> ParsedOutput:
        raise NotImplementedError


class HermesToolParser(ToolParser):
    name = "hermes"
    START, END = "<tool_call>", "</tool_call>"

    def parse(self, text: str, final: bool) -> ParsedOutput:
        first = text.find(self.START)
        if first < 0:
            return ParsedOutput(text if final else _held_back(text, self.START))
        calls, i = [], first
        while i >= 0:
            body = _skip(text, i + len(self.START), "")
            if body >= len(text):
                break
            call, end = _call_at(text, body, ("arguments", "parameters"))
            if call is None:
                break
            calls.append(call)
            if end < 0:
                break
            i = text.find(self.START, end)
        if final and not _all_complete(calls):
            return ParsedOutput(text)  # not a well-formed call after all: the model's text, as vLLM
        return ParsedOutput(text[:first].rstrip() if final else text[:first], calls)


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    TAG = "<|python_tag|>"

    def parse(self, text: str, final: bool) -> ParsedOutput:
        start = _skip(text, 0, "")
        if text.startswith(self.TAG, start):
            start = _skip(text, start + len(self.TAG), "")
        elif start < len(text) and self.TAG.startswith(text[start:]) and not final:
            return ParsedOutput("")
        if start >= len(text):
            return ParsedOutput(text if final else "")
        if text[start] != "{":
            return ParsedOutput(text)
        calls, i = [], start
        while i < len(text) and text[i] == "{":
            call, end = _call_at(text, i, ("parameters", "arguments"))
            if call is None:
                break
            calls.append(call)
            if end < 0:
                break
            i = _skip(text, end, ";")
        if final and not _all_complete(calls):
            return ParsedOutput(text)
        return ParsedOutput("", calls)


class MistralToolParser(ToolParser):
    name = "mistral"
    MARKER = "[TOOL_CALLS]"
    _ARGS = "[ARGS]"

    def parse(self, text: str, final: bool) -> ParsedOutput:
        first = text.find(self.MARKER)
        if first < 0:
            return ParsedOutput(text if final else _held_back(text, self.MARKER))
        content, calls = text[:first], []
        for piece in text[first:].split(self.MARKER)[1:]:
            i = _skip(piece, 0, "")
            if i < len(piece) and piece[i] == "[":
                found, _ = _json_array(piece, i, ("arguments", "parameters"))
                calls += found
            elif i < len(piece):
                calls.append(self._name_then_args(piece[i:]))
        if final and not _all_complete(calls):
            return ParsedOutput(text)
        return ParsedOutput(content.rstrip() if final else content, calls)

    def _name_then_args(self, piece: str) -> ParsedCall:
        """v11+ tokenizers: name[ARGS]{...} (or name{...})."""
        brace = piece.find("{")
        if brace < 0:
            return ParsedCall(None, "")
        name = piece[:brace].removesuffix(self._ARGS).strip()
        try:
            _, end = _DECODER.raw_decode(piece, brace)
            return ParsedCall(name, piece[brace:end], True)
        except json.JSONDecodeError:
            return ParsedCall(name, piece[brace:])


class RequiredToolParser(ToolParser):
    """tool_choice "required": the grammar makes the whole output a JSON array of calls."""

    name = "required"

    def parse(self, text: str, final: bool) -> ParsedOutput:
        start = _skip(text, 0, "")
        if start >= len(text) or text[start] != "[":
            return ParsedOutput(text if final else "")
        calls, _ = _json_array(text, start, ("parameters", "arguments"))
        return ParsedOutput("", calls)


class NamedToolParser(ToolParser):
    """tool_choice naming a function: the grammar makes the whole output its arguments object."""

    name = "named"

    def __init__(self, function_name: str) -> None:
        self.function_name = function_name

    def parse(self, text: str, final: bool) -> ParsedOutput:
        stripped = text.strip()
        complete = False
        if stripped:
            try:
                json.loads(stripped)
                complete = True
            except json.JSONDecodeError:
                pass
        return ParsedOutput(
            "", [ParsedCall(self.function_name, stripped if final else text.lstrip(), complete)]
        )


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesToolParser, Llama3JsonToolParser, MistralToolParser)
}


def get_tool_parser(name: str) -> ToolParser:
    if name not in TOOL_PARSERS:
        raise ValueError(f"unknown tool call parser {name!r}; choose one of {', '.join(TOOL_PARSERS)}")
    return TOOL_PARSERS[name]()


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(slots=True)
class ToolCallUpdate:
    """What a stream sends for one call this step: id/name on the call's first update, then text."""

    index: int
    id: str | None
    name: str | None
    arguments: str


class ToolCallStreamer:
    """Per choice: diffs successive parses of the cumulative text into content and call deltas."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.content_sent = 0
        self.ids: list[str] = []  # one per call already announced
        self.args_sent: list[int] = []

    def feed(self, text: str, final: bool) -> tuple[str, list[ToolCallUpdate]]:
        parsed = self.parser.parse(text, final)
        content = parsed.content[self.content_sent :] if len(parsed.content) > self.content_sent else ""
        self.content_sent = max(self.content_sent, len(parsed.content))
        updates = []
        for index, call in enumerate(parsed.calls):
            if call.name is None:
                break
            new_call = index >= len(self.ids)
            if new_call:
                self.ids.append(new_call_id())
                self.args_sent.append(0)
            delta = call.arguments[self.args_sent[index] :]
            if new_call or delta:
                updates.append(
                    ToolCallUpdate(
                        index, self.ids[index] if new_call else None, call.name if new_call else None, delta
                    )
                )
                self.args_sent[index] = len(call.arguments)
        return content, updates

    @property
    def num_calls(self) -> int:
        return len(self.ids)
