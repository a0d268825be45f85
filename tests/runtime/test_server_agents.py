"""What agent frameworks send, through a real server and the official `openai` client: structured
outputs (response_format / guided_* / structured_outputs), tool calling (auto / required / named,
streamed and not, role "tool" messages), GET /v1/models/{id}, SSE line-separator escaping."""

from __future__ import annotations

import json
import random
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest

pytestmark = pytest.mark.slow  # a real server process (torch import + model load)

# A Hermes/Qwen-style template: tools listed in the system turn, calls as <tool_call> JSON, results
# as "tool" turns; the tiny tokenizer's own template knows none of these.
TOOL_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|system|>\nTools: {% for t in tools %}{{ t.function.name }} {% endfor %}"
    "{{ eos_token }}\n{% endif %}{% for m in messages %}<|{{ m.role }}|>\n{% if m.tool_calls %}"
    "{% for c in m.tool_calls %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}"
    "{% else %}{{ m.content }}{% endif %}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
SEARCH = {
    "type": "object",
    "properties": {
        "query": {"type": "string", "maxLength": 12},
        "limit": {"type": "integer", "minimum": 1, "maximum": 20},
    },
    "required": ["query"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "search", "parameters": SEARCH}},
]
SCHEMAS = {"get_weather": WEATHER, "search": SEARCH}
MSG = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def agent_server(tiny_model_dir, tmp_path_factory, launch_server):
    model_dir = tmp_path_factory.mktemp("agent") / "tiny-tools"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "chat_template.jinja").write_text(TOOL_TEMPLATE)
    proc = launch_server(
        model_dir,
        tmp_path_factory.mktemp("agent-logs"),
        "--num-blocks",
        "512",
        "--max-model-len",
        "512",
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "hermes",
    )
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def client(agent_server):
    return agent_server.openai()


# --- random agent-style schemas ---------------------------------------------------------------------


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """An object schema of the kinds agents send: nested objects, enums, arrays, required fields,
    additionalProperties false (strict mode); strings and arrays bounded so a random model ends."""
    props = {}
    for i in range(rng.randint(1, 4)):
        kind = rng.choice(
            ["string", "integer", "boolean", "enum", "array", "object"]
            if depth < 2
            else ["string", "integer", "boolean", "enum"]
        )
        if kind == "string":
            prop = {"type": "string", "maxLength": rng.randint(1, 8)}
        elif kind == "integer":
            prop = {"type": "integer", "minimum": -5, "maximum": rng.randint(0, 500)}
        elif kind == "boolean":
            prop = {"type": "boolean"}
        elif kind == "enum":
            prop = {"enum": rng.sample(["low", "mid", "high", "none", "x-1", "ok"], rng.randint(1, 4))}
        elif kind == "array":
            prop = {
                "type": "array",
                "items": rng.choice(
                    [{"type": "string", "maxLength": 4}, {"type": "integer", "minimum": 0, "maximum": 9}]
                ),
                "minItems": rng.randint(0, 1),
                "maxItems": rng.randint(1, 3),
            }
        else:
            prop = random_schema(rng, depth + 1)
        props[f"f{depth}_{i}_{kind}"] = prop
    required = [k for k in props if rng.random() < 0.7]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def test_twenty_random_json_schemas_parse_and_validate(client):
    rng = random.Random(2024)
    schemas = [random_schema(rng) for _ in range(20)]

    def ask(i: int):
        return client.chat.completions.create(
            model="tiny",
            messages=MSG,
            max_tokens=300,
            temperature=0.8,
            seed=i,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": f"s{i}", "schema": schemas[i], "strict": True},
            },
        )

    with ThreadPoolExecutor(4) as pool:  # several constrained rows share the engine's batches
        responses = list(pool.map(ask, range(20)))
    for schema, response in zip(schemas, responses, strict=True):
        choice = response.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_object_and_vllm_guided_fields(client, agent_server):
    obj = client.chat.completions.create(
        model="tiny",
        messages=MSG,
        max_tokens=100,
        temperature=0.7,
        seed=0,
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
    choice = client.completions.create(
        model="tiny", prompt="Pick:", max_tokens=20, extra_body={"guided_choice": ["red", "green", "blue"]}
    )
    assert choice.choices[0].text in ("red", "green", "blue")
    regex = agent_server.post(
        "/v1/completions",
        json={"prompt": "Code:", "max_tokens": 20, "structured_outputs": {"regex": "[A-Z]{3}-[0-9]{2}"}},
    )
    assert regex.status_code == 200 and len(regex.json()["choices"][0]["text"]) == 6
    stream = client.chat.completions.create(
        model="tiny",
        messages=MSG,
        max_tokens=200,
        stream=True,
        seed=1,
        temperature=0.8,
        extra_body={"guided_json": SEARCH},
    )
    jsonschema.validate(
        json.loads("".join(c.choices[0].delta.content or "" for c in stream if c.choices)), SEARCH
    )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema",
        ),
        ({"guided_json": {"type": "object"}, "guided_regex": "a+"}, "guided_regex"),
        ({"guided_regex": "(unclosed"}, "guided_regex"),
        ({"guided_json": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}, "guided_json"),
        ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
        ({"guided_decoding_backend": "outlines", "guided_regex": "a"}, "guided_decoding_backend"),
        ({"structured_outputs": {"jsn": {}}}, "structured_outputs.jsn"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
        ),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}],
                "tool_choice": "required",
            },
            "tools.0.function.parameters",
        ),
    ],
    ids=[
        "schema-missing",
        "two-constraints",
        "bad-regex",
        "bad-schema",
        "whitespace-pattern",
        "other-backend",
        "misspelt-constraint",
        "unknown-named-tool",
        "required-without-tools",
        "required-plus-format",
        "bad-tool-schema",
    ],
)
def test_bad_constraints_and_tool_choices_are_400_naming_the_field(agent_server, body, param):
    response = agent_server.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 4, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


# --- tool calling -----------------------------------------------------------------------------------


def _check_calls(calls) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("seed", range(4))
def test_tool_choice_required_always_yields_valid_arguments(client, seed):
    """One call (parallel_tool_calls false: the grammar allows one): a random model at temperature 1
    still ends with a complete, schema-valid call."""
    response = client.chat.completions.create(
        model="tiny",
        messages=MSG,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=250,
        temperature=1.0,
        seed=seed,
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    _check_calls(choice.message.tool_calls)


def test_required_parallel_calls_are_each_valid(client):
    """Parallel calls (the default): every call the array holds parses against its function."""
    response = client.chat.completions.create(
        model="tiny",
        messages=MSG,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=300,
        temperature=0.6,
        seed=11,
    )
    _check_calls(response.choices[0].message.tool_calls)


def collect_stream(stream) -> tuple[str, dict[int, dict], str | None]:
    """OpenAI's delta protocol folded back: content, {index: {id, name, arguments}}, finish_reason."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            if tc.index not in calls:
                assert tc.id and tc.type == "function" and tc.function.name  # the first delta names the call
                calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
            else:
                assert tc.id is None and tc.function.name is None
            calls[tc.index]["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return content, calls, finish


@pytest.mark.parametrize("seed", range(3))
def test_streamed_required_tool_calls_arrive_as_incremental_deltas(client, seed):
    stream = client.chat.completions.create(
        model="tiny",
        messages=MSG,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=250,
        temperature=1.0,
        seed=seed,
        stream=True,
    )
    content, calls, finish = collect_stream(stream)
    assert content == "" and finish == "tool_calls" and calls
    for call in calls.values():
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])
    same = client.chat.completions.create(
        model="tiny",
        messages=MSG,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=250,
        temperature=1.0,
        seed=seed,
    )
    assert [(c.function.name, c.function.arguments) for c in same.choices[0].message.tool_calls] == [
        (c["name"], c["arguments"]) for c in calls.values()
    ]


def test_named_tool_choice_streamed_and_not(client):
    named = {"type": "function", "function": {"name": "search"}}
    response = client.chat.completions.create(
        model="tiny", messages=MSG, tools=TOOLS, tool_choice=named, max_tokens=200, temperature=0.9, seed=5
    )
    (call,) = response.choices[0].message.tool_calls
    assert call.function.name == "search" and response.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(call.function.arguments), SEARCH)
    _, calls, _ = collect_stream(
        client.chat.completions.create(
            model="tiny",
            messages=MSG,
            tools=TOOLS,
            tool_choice=named,
            max_tokens=200,
            temperature=0.9,
            seed=5,
            stream=True,
        )
    )
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [("search", call.function.arguments)]


HERMES_CALL = r'Checking\.<tool_call>\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)", "unit": "c"\}\}</tool_call>'


def test_auto_tool_choice_parses_the_models_hermes_calls(client):
    """The model's own text goes through --tool-call-parser hermes (a regex makes the random model
    write a Hermes call, so the parser sees exactly what a Qwen model writes)."""
    response = client.chat.completions.create(
        model="tiny",
        messages=MSG,
        tools=TOOLS,
        max_tokens=200,
        extra_body={"structured_outputs": {"regex": HERMES_CALL}},
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] in (
        "Paris",
        "Rome",
    )
    content, calls, finish = collect_stream(
        client.chat.completions.create(
            model="tiny",
            messages=MSG,
            tools=TOOLS,
            max_tokens=200,
            stream=True,
            extra_body={"structured_outputs": {"regex": HERMES_CALL}},
        )
    )
    assert content == "Checking." and finish == "tool_calls"
    assert [c["name"] for c in calls.values()] == ["get_weather"]
    plain = client.chat.completions.create(
        model="tiny",
        messages=MSG,
        tools=TOOLS,
        tool_choice="none",
        max_tokens=200,
        extra_body={"structured_outputs": {"regex": HERMES_CALL}},
    )
    assert plain.choices[0].message.tool_calls == [] and "<tool_call>" in plain.choices[0].message.content


def test_tool_results_go_through_the_chat_template(agent_server, client):
    turn = [
        *MSG,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    ids = agent_server.post("/tokenize", json={"messages": turn}).json()["tokens"]
    text = agent_server.post("/detokenize", json={"tokens": ids}).json()["prompt"]
    assert (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}</tool_call>' in text
    )
    assert "<|tool|>\nsunny, 21 C" in text
    response = client.chat.completions.create(
        model="tiny", messages=turn, tools=TOOLS, tool_choice="none", max_tokens=4
    )
    with_tools = response.usage.prompt_tokens
    assert (
        with_tools
        > client.chat.completions.create(model="tiny", messages=turn, max_tokens=4).usage.prompt_tokens
    )


def test_auto_tool_choice_needs_the_server_flag(server):
    response = server.post("/v1/chat/completions", json={"messages": MSG, "tools": TOOLS, "max_tokens": 4})
    assert response.status_code == 400 and response.json()["error"]["param"] == "tool_choice"
    assert "--enable-auto-tool-choice" in response.json()["error"]["message"]


def test_tokenizer_info(agent_server, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    info = agent_server.get("/tokenizer_info").json()
    assert info["chat_template"] == TOOL_TEMPLATE and info["model_max_length"] == 512
    assert (info["eos_token"], info["bos_token"], info["vocab_size"]) == ("</s>", "<s>", len(tok))
    assert info["added_tokens_decoder"] == {"0": "<s>", "1": "</s>", "2": "<pad>"}


# --- models/{id}, SSE escaping ------------------------------------------------------------------------


def test_models_retrieve(client):
    model = client.models.retrieve("tiny")
    assert model.id == "tiny" and model.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_sse_escapes_unicode_line_separators_for_line_readers(agent_server, path):
    text = "a\u2028b\u0085c\u2029d"
    body = {
        "max_tokens": 30,
        "stream": True,
        "guided_choice": [text],
        **({"prompt": "x"} if path == "/v1/completions" else {"messages": MSG}),
    }
    got = ""
    with httpx.stream("POST", agent_server.base_url + path, json=body, timeout=60) as response:
        for line in response.iter_lines():  # splits at U+2028/U+2029/U+0085 too
            if not line.startswith("data: ") or line == "data: [DONE]":
                assert line == "" or line == "data: [DONE]", repr(line)
                continue
            assert "\u2028" not in line and "\u0085" not in line
            choice = json.loads(line[6:])["choices"][0]
            got += choice.get("text") or choice.get("delta", {}).get("content") or ""
    assert got == text


# --- Responses API --------------------------------------------------------------------------------

RESPONSE_TOOLS = [
    {"type": "function", "name": "get_weather", "description": "Weather now", "parameters": WEATHER},
    {"type": "function", "name": "search", "parameters": SEARCH},
]


def test_responses_text_and_json_schema(client):
    response = client.responses.create(
        model="tiny", input="Hello", instructions="Be brief.", max_output_tokens=6
    )
    assert (
        response.object == "response" and response.status == "incomplete"
    )  # 6 tokens: cut by max_output_tokens
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].type == "message" and response.output_text == response.output[0].content[0].text
    assert response.usage.output_tokens == 6 and response.usage.input_tokens > 0
    structured = client.responses.create(
        model="tiny",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Plan"}]}],
        temperature=0.8,
        max_output_tokens=200,
        text={"format": {"type": "json_schema", "name": "s", "schema": SEARCH, "strict": True}},
    )
    assert structured.status == "completed"
    jsonschema.validate(json.loads(structured.output_text), SEARCH)


def test_responses_tool_call_round_trip(client):
    response = client.responses.create(
        model="tiny",
        input="Weather in Paris?",
        tools=RESPONSE_TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=1.0,
        max_output_tokens=200,
    )
    (call,) = [item for item in response.output if item.type == "function_call"]
    assert call.call_id.startswith("call_") and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    follow_up = client.responses.create(
        model="tiny",
        tools=RESPONSE_TOOLS,
        max_output_tokens=5,
        tool_choice="none",
        input=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "type": "function_call",
                "call_id": call.call_id,
                "name": call.name,
                "arguments": call.arguments,
            },
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
        ],
    )
    # tool_choice "none": no call comes back; the first call was sampled (temperature 1.0), so the
    # follow-up may end at once and hold no message item (an empty answer has none), never a call
    assert follow_up.status in ("completed", "incomplete")  # incomplete: max_output_tokens=5 reached
    assert all(item.type == "message" for item in follow_up.output), follow_up.output
    assert (
        follow_up.usage.input_tokens > response.usage.input_tokens
    )  # the call and its result are in the prompt


def test_responses_stream_events(client):
    events = list(client.responses.create(model="tiny", input="Hello", max_output_tokens=12, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.incomplete"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == next(e.text for e in events if e.type == "response.output_text.done")
    assert events[-1].response.output_text == text
    named = {"type": "function", "name": "search"}
    events = list(
        client.responses.create(
            model="tiny",
            input="Find",
            tools=RESPONSE_TOOLS,
            tool_choice=named,
            temperature=0.9,
            max_output_tokens=200,
            stream=True,
        )
    )
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert done.arguments == args and events[-1].type == "response.completed"
    jsonschema.validate(json.loads(args), SEARCH)
    assert events[-1].response.output[0].arguments == args


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
        ({"input": "x", "store": True}, "store"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools.0.type"),
        ({"input": [{"type": "input_image", "image_url": "x"}]}, "input.0.type"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "input.0.content.0.type",
        ),
        ({"input": "x", "background": True}, "background"),
        ({"input": []}, "input"),
    ],
    ids=[
        "previous-response",
        "store",
        "builtin-tool",
        "image-item",
        "file-part",
        "background",
        "empty-input",
    ],
)
def test_responses_refusals_name_the_field(agent_server, body, param):
    response = agent_server.post("/v1/responses", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
