"""openai_requests on CPU, no model: request fields -> SamplingParams, limits, the 400s and their params.
End-to-end refusals through a real server are in test_server_errors.py; these pin the edges."""

from __future__ import annotations

import pytest

from lmforge.runtime import openai_protocol as proto
from lmforge.runtime.openai_requests import (
    APIError,
    ModelContext,
    chat_ids,
    check_token_ids,
    param_from_loc,
    prepare_chat,
    prepare_completion,
    resolve_max_tokens,
    sampling_params,
    validation_error,
)
from lmforge.runtime.sampling_params import SamplingParams


class CharTokenizer:
    """One token per character (id = code point); the chat template is 'role: content' lines."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([1] if add_special_tokens else []) + [ord(ch) for ch in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)

    def apply_chat_template(
        self, conversation: list[dict], tokenize: bool, add_generation_prompt: bool, **kwargs: object
    ) -> str:
        if kwargs.get("fail"):
            raise RuntimeError("template says no")
        text = "".join(f"{m['role']}: {m['content']}\n" for m in conversation)
        return text + ("assistant: " if add_generation_prompt else "")


CONTEXT = ModelContext(CharTokenizer(), max_model_len=32, vocab_size=256)


def refusal(fn, *args) -> tuple[int, str | None, str]:
    with pytest.raises(APIError) as info:
        fn(*args)
    return info.value.status, info.value.param, info.value.message


# --- sampling params --------------------------------------------------------------------------------


def test_sampling_params_maps_openai_defaults_and_vllm_spellings():
    req = proto.CompletionRequest(prompt="x", top_k=0, stop="##", seed=-1, min_tokens=50, stop_token_ids=[7])
    assert sampling_params(req, max_tokens=10, logprobs=2) == SamplingParams(
        n=1,
        temperature=1.0,
        top_p=1.0,
        top_k=-1,
        min_p=0.0,
        repetition_penalty=1.0,
        seed=2**63 - 1,
        max_tokens=10,
        min_tokens=10,
        stop=["##"],
        stop_token_ids=[7],
        logprobs=2,
    )


def test_sampling_params_keeps_explicit_values():
    req = proto.ChatCompletionRequest(
        messages=[{"role": "user", "content": "x"}],
        temperature=0,
        top_p=0.5,
        top_k=5,
        min_p=0.1,
        repetition_penalty=1.2,
        stop=["a", "b"],
        n=3,
        skip_special_tokens=False,
        ignore_eos=True,
    )
    params = sampling_params(req, max_tokens=4, logprobs=None)
    assert (params.temperature, params.top_p, params.top_k, params.min_p, params.repetition_penalty) == (
        0.0,
        0.5,
        5,
        0.1,
        1.2,
    )
    assert (params.n, params.stop, params.skip_special_tokens, params.ignore_eos) == (
        3,
        ["a", "b"],
        False,
        True,
    )


# --- limits -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_prompt", "requested", "explicit", "want"),
    [
        (10, None, False, 22),  # no max_tokens: the rest of the window
        (10, 16, False, 16),
        (30, 16, False, 2),  # the completions default (16) is capped quietly
        (10, 22, True, 22),  # exactly fills the window
    ],
    ids=["rest-of-window", "fits", "default-capped", "exact-fit"],
)
def test_resolve_max_tokens(num_prompt, requested, explicit, want):
    assert resolve_max_tokens(32, num_prompt, requested, explicit, "prompt") == want


@pytest.mark.parametrize(
    ("num_prompt", "requested", "explicit", "param"),
    [
        (0, None, False, "prompt"),
        (32, None, False, "prompt"),  # no room left for even one token
        (10, 23, True, "max_tokens"),
    ],
    ids=["empty", "prompt-fills-window", "explicit-too-large"],
)
def test_resolve_max_tokens_refusals(num_prompt, requested, explicit, param):
    status, got_param, _ = refusal(resolve_max_tokens, 32, num_prompt, requested, explicit, "prompt")
    assert (status, got_param) == (400, param)


def test_check_token_ids_bounds():
    check_token_ids([0, 255], 256, "prompt")
    assert refusal(check_token_ids, [3, 256, -1], 256, "tokens") == (
        400,
        "tokens",
        "token id 256 is out of range [0, 256)",
    )


# --- prompts ----------------------------------------------------------------------------------------


def test_prepare_completion_uses_the_tightest_max_tokens_and_decodes_echoed_token_prompts():
    req = proto.CompletionRequest(prompt=[[104, 105], [120] * 20], echo=True)  # max_tokens: default 16
    prepared = prepare_completion(req, CONTEXT, "tiny")
    assert prepared.prompt_ids == [[104, 105], [120] * 20]
    assert prepared.prompt_texts == ["hi", "x" * 20]
    assert prepared.params.max_tokens == 12 and prepared.model == "tiny"


def test_prepare_completion_text_prompt_without_echo():
    prepared = prepare_completion(proto.CompletionRequest(prompt="ab", max_tokens=3), CONTEXT, "tiny")
    assert (prepared.prompt_ids, prepared.prompt_texts, prepared.params.max_tokens) == (
        [[1, 97, 98]],
        ["ab"],
        3,
    )


def test_prepare_completion_echo_with_logprobs_asks_for_prompt_logprobs():
    echo = prepare_completion(proto.CompletionRequest(prompt="ab", echo=True, logprobs=2), CONTEXT, "tiny")
    assert (echo.params.logprobs, echo.params.prompt_logprobs, echo.echo_only) == (2, 2, False)
    plain = prepare_completion(proto.CompletionRequest(prompt="ab", logprobs=2), CONTEXT, "tiny")
    assert plain.params.prompt_logprobs is None
    explicit = prepare_completion(
        proto.CompletionRequest(prompt="ab", echo=True, logprobs=2, prompt_logprobs=0), CONTEXT, "tiny"
    )
    assert explicit.params.prompt_logprobs == 0  # vLLM: an explicit prompt_logprobs wins


def test_prepare_completion_echo_with_max_tokens_zero_runs_one_step():
    req = proto.CompletionRequest(prompt=[7] * 32, echo=True, logprobs=1, max_tokens=0)  # the whole window
    prepared = prepare_completion(req, CONTEXT, "tiny")
    assert (prepared.params.max_tokens, prepared.params.prompt_logprobs, prepared.echo_only) == (1, 1, True)
    too_long = proto.CompletionRequest(prompt=[7] * 33, echo=True, max_tokens=0)
    assert refusal(prepare_completion, too_long, CONTEXT, "tiny")[:2] == (400, "prompt")
    no_echo = proto.CompletionRequest(prompt="ab", max_tokens=0)
    assert refusal(prepare_completion, no_echo, CONTEXT, "tiny")[:2] == (400, "max_tokens")


def test_prompt_logprobs_field_is_vllms():
    chat = proto.ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], prompt_logprobs=3)
    assert prepare_chat(chat, CONTEXT, "tiny").params.prompt_logprobs == 3
    with pytest.raises(ValueError, match="not available when stream is true"):
        proto.CompletionRequest(prompt="hi", prompt_logprobs=1, stream=True)
    assert proto.CompletionRequest(prompt="hi", prompt_logprobs=0, stream=True).prompt_logprobs == 0
    with pytest.raises(ValueError, match="less than or equal to 20"):
        proto.CompletionRequest(prompt="hi", prompt_logprobs=21)


def test_prepare_chat_prefers_max_completion_tokens():
    req = proto.ChatCompletionRequest(
        messages=[{"role": "user", "content": "hi", "name": "bo"}],
        max_tokens=9,
        max_completion_tokens=2,
        logprobs=True,
    )
    prepared = prepare_chat(req, CONTEXT, "tiny")
    assert CharTokenizer().decode(prepared.prompt_ids[0]) == "user: hi\nassistant: "
    assert (prepared.params.max_tokens, prepared.params.logprobs, prepared.prompt_texts) == (2, 0, [""])


def test_chat_template_failures_are_400_on_messages():
    user = [proto.ChatMessage(role="user", content="hi")]
    status, param, message = refusal(chat_ids, CharTokenizer(), user, True, False, {"fail": True})
    assert (status, param, message) == (400, "messages", "chat template failed: template says no")
    image = [proto.ChatMessage(role="user", content=[{"type": "image_url", "image_url": {"url": "x"}}])]
    assert refusal(chat_ids, CharTokenizer(), image, True, False, None)[:2] == (400, "messages")


# --- pydantic validation errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loc", "param"),
    [
        (("body", "messages", 0, "role"), "messages.0.role"),
        (("body", "prompt", "str"), "prompt"),
        (("body", "prompt", "list[constrained-int]", 2), "prompt"),
        (("body",), ""),
        (("query", "body"), "query.body"),  # only a leading 'body' is the request body
    ],
    ids=["nested", "union-tag", "parametrized-union-tag", "whole-body", "inner-body"],
)
def test_param_from_loc(loc, param):
    assert param_from_loc(loc) == param


def test_validation_error_reports_each_param_once_with_its_first_message():
    errors = [
        {"loc": ("body", "prompt", "str"), "msg": "Input should be a valid string"},
        {"loc": ("body", "prompt", "list[int]"), "msg": "Input should be a valid list"},
        {"loc": ("body", "n"), "msg": "Value error, n must be positive"},
    ]
    err = validation_error(errors)
    assert (err.status, err.param, err.message) == (
        400,
        "prompt",
        "prompt: Input should be a valid string; n: n must be positive",
    )


def test_validation_error_lists_at_most_five_fields():
    err = validation_error([{"loc": ("body", f"f{i}"), "msg": "bad"} for i in range(7)])
    assert err.message == "; ".join(f"f{i}: bad" for i in range(5))


def test_validation_error_whole_body_and_malformed_json():
    assert (
        validation_error([{"loc": ("body",), "msg": "not an object"}]).message,
        validation_error([{"loc": ("body",), "msg": "x"}]).param,
    ) == ("body: not an object", None)
    err = validation_error(
        [
            {
                "type": "json_invalid",
                "loc": ("body", 17),
                "msg": "JSON decode error",
                "ctx": {"error": "Expecting value"},
            }
        ]
    )
    assert (err.message, err.param) == ("Malformed JSON body: Expecting value", None)


def test_api_error_body_defaults_code_to_status():
    assert APIError(404, "gone", "NotFoundError", "model").body().model_dump() == {
        "error": {"message": "gone", "type": "NotFoundError", "param": "model", "code": 404}
    }


# --- structured outputs and tools ---------------------------------------------------------------------


def test_structured_outputs_spellings_map_to_one_constraint():
    from lmforge.runtime.openai_requests import structured_outputs
    from lmforge.runtime.sampling_params import StructuredOutputsParams

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    expected = StructuredOutputsParams(json='{"type": "object", "properties": {"a": {"type": "integer"}}}')
    for fields in (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}},
        {"guided_json": schema},
        {"structured_outputs": {"json": schema}},
    ):
        assert structured_outputs(proto.CompletionRequest(prompt="x", **fields)) == expected
    assert structured_outputs(
        proto.CompletionRequest(prompt="x", guided_choice=["a", "b"])
    ) == StructuredOutputsParams(choice=("a", "b"))
    assert structured_outputs(proto.CompletionRequest(prompt="x", response_format={"type": "text"})) is None
    assert (
        refusal(structured_outputs, proto.CompletionRequest(prompt="x", guided_choice=[]))[1]
        == "guided_choice"
    )


def test_tool_constraints_pin_vllm_formats():
    import json

    from lmforge.runtime.openai_requests import tool_constraint, tool_mode

    tools = [
        proto.ChatTool(type="function", function={"name": "f", "parameters": {"type": "object"}}),
        proto.ChatTool(type="function", function={"name": "g"}),
    ]
    req = proto.ChatCompletionRequest(
        messages=[{"role": "user", "content": "x"}],
        tools=tools,
        tool_choice="required",
        parallel_tool_calls=False,
    )
    mode = tool_mode(req, CONTEXT)
    assert (mode.choice, mode.parser, mode.parallel) == ("required", "required", False)
    schema = json.loads(tool_constraint(mode, tools).json)
    assert schema["minItems"] == 1 and schema["maxItems"] == 1
    assert [c["properties"]["name"] for c in schema["items"]["anyOf"]] == [{"const": "f"}, {"const": "g"}]
    assert schema["items"]["anyOf"][1]["properties"]["parameters"] == {
        "type": "object"
    }  # no parameters: any object
    named = req.model_copy(
        update={
            "tool_choice": proto.NamedToolChoice(type="function", function={"name": "f"}),
            "parallel_tool_calls": None,
        }
    )
    assert json.loads(tool_constraint(tool_mode(named, CONTEXT), tools).json) == {"type": "object"}
    auto = req.model_copy(update={"tool_choice": "auto"})
    assert (
        refusal(tool_mode, auto, CONTEXT)[1] == "tool_choice"
    )  # the server runs without --enable-auto-tool-choice
    with_flag = ModelContext(
        CharTokenizer(), 32, 256, tool_call_parser="mistral", enable_auto_tool_choice=True
    )
    assert tool_mode(auto, with_flag).parser == "mistral"


@pytest.mark.parametrize("field", ["functions", "function_call", "audio", "prediction", "web_search_options"])
def test_unsupported_chat_fields_are_refused_by_name(field):
    req = proto.ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], **{field: {"x": 1}})
    assert refusal(prepare_chat, req, CONTEXT, "m")[:2] == (400, field)
