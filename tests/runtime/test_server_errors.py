"""Bad input never yields a 500 or a dead engine: an OpenAI-style error body with the right status."""

from __future__ import annotations

import json

import openai
import pytest

pytestmark = pytest.mark.slow  # a real server process (torch import + model load)

LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 40  # > 256 tokens
MSG = [{"role": "user", "content": "hi"}]

# (id, path, body: dict or raw str, status, param or None)
CASES = [
    ("unknown-model", "/v1/completions", {"model": "gpt-9", "prompt": "hi"}, 404, "model"),
    ("unknown-model-chat", "/v1/chat/completions", {"model": "gpt-9", "messages": MSG}, 404, "model"),
    ("max-tokens-zero", "/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("max-tokens-negative", "/v1/chat/completions", {"messages": MSG, "max_tokens": -5}, 400, "max_tokens"),
    (
        "max-completion-tokens-zero",
        "/v1/chat/completions",
        {"messages": MSG, "max_completion_tokens": 0},
        400,
        "max_completion_tokens",
    ),
    ("prompt-too-long", "/v1/completions", {"prompt": LONG_PROMPT}, 400, "prompt"),
    (
        "chat-too-long",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": LONG_PROMPT}]},
        400,
        "messages",
    ),
    (
        "prompt-plus-max-tokens-too-long",
        "/v1/completions",
        {"prompt": "hi", "max_tokens": 1000},
        400,
        "max_tokens",
    ),
    ("malformed-json", "/v1/completions", '{"prompt": "hi", ', 400, None),
    ("json-not-an-object", "/v1/chat/completions", "[1, 2, 3]", 400, None),
    ("missing-prompt", "/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("missing-messages", "/v1/chat/completions", {"max_tokens": 3}, 400, "messages"),
    ("empty-messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    (
        "bad-role",
        "/v1/chat/completions",
        {"messages": [{"role": "robot", "content": "x"}]},
        400,
        "messages.0.role",
    ),
    ("max-tokens-string", "/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ("prompt-number", "/v1/completions", {"prompt": 42}, 400, None),
    ("stream-not-bool", "/v1/completions", {"prompt": "hi", "stream": "maybe"}, 400, "stream"),
    ("temperature-negative", "/v1/completions", {"prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ("temperature-nan", "/v1/completions", '{"prompt": "hi", "temperature": NaN}', 400, "temperature"),
    ("top-p-zero", "/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("top-p-above-one", "/v1/chat/completions", {"messages": MSG, "top_p": 1.5}, 400, "top_p"),
    ("top-k-invalid", "/v1/completions", {"prompt": "hi", "top_k": -7}, 400, "top_k"),
    ("min-p-above-one", "/v1/completions", {"prompt": "hi", "min_p": 2}, 400, "min_p"),
    (
        "presence-penalty-range",
        "/v1/completions",
        {"prompt": "hi", "presence_penalty": 3},
        400,
        "presence_penalty",
    ),
    (
        "repetition-penalty-zero",
        "/v1/completions",
        {"prompt": "hi", "repetition_penalty": 0},
        400,
        "repetition_penalty",
    ),
    ("n-zero", "/v1/completions", {"prompt": "hi", "n": 0}, 400, "n"),
    ("logprobs-too-many", "/v1/completions", {"prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    (
        "top-logprobs-without-logprobs",
        "/v1/chat/completions",
        {"messages": MSG, "top_logprobs": 3},
        400,
        None,
    ),
    ("token-id-out-of-vocab", "/v1/completions", {"prompt": [1, 2, 10_000_000]}, 400, "prompt"),
    ("token-id-negative", "/v1/completions", {"prompt": [1, -2]}, 400, "prompt"),
    ("empty-token-list", "/v1/completions", {"prompt": []}, 400, None),
    ("lone-surrogate", "/v1/completions", '{"prompt": "bad \\ud83d text"}', 400, "prompt"),
    (
        "prompt-logprobs-streamed",
        "/v1/completions",
        {"prompt": "hi", "prompt_logprobs": 1, "stream": True},
        400,
        None,
    ),
    (
        "prompt-logprobs-too-many",
        "/v1/chat/completions",
        {"messages": MSG, "prompt_logprobs": 21},
        400,
        "prompt_logprobs",
    ),
    (
        "max-tokens-zero-echo-too-long",
        "/v1/completions",
        {"prompt": LONG_PROMPT, "echo": True, "max_tokens": 0},
        400,
        "prompt",
    ),
    (
        "stream-options-without-stream",
        "/v1/completions",
        {"prompt": "hi", "stream_options": {"include_usage": True}},
        400,
        None,
    ),
    (
        "image-content",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
        "messages",
    ),
    (
        "json-schema-format",
        "/v1/chat/completions",
        {"messages": MSG, "response_format": {"type": "json_schema"}},
        400,
        None,
    ),
    ("detokenize-bad-id", "/detokenize", {"tokens": [99999999]}, 400, "tokens"),
    ("tokenize-both-inputs", "/tokenize", {"prompt": "x", "messages": MSG}, 400, None),
]


def _assert_error_body(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    return error


@pytest.mark.parametrize(
    ("path", "body", "status", "param"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_request_gets_openai_error(server, path, body, status, param):
    content = body if isinstance(body, str) else json.dumps(body)
    response = server.post(path, content=content, headers={"Content-Type": "application/json"})
    error = _assert_error_body(response, status)
    if param is not None:
        assert error["param"] == param


def test_unknown_route_and_method(server):
    _assert_error_body(server.get("/v1/nothing-here"), 404)
    _assert_error_body(server.get("/v1/completions"), 405)


def test_openai_client_raises_typed_errors(server):
    client = server.openai()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="hi")
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="hi", max_tokens=0)
    assert info.value.status_code == 400


def test_engine_survives_all_bad_requests(server):
    for _, path, body, _, _ in CASES:  # again, back to back, then a normal request
        content = body if isinstance(body, str) else json.dumps(body)
        server.post(path, content=content, headers={"Content-Type": "application/json"})
    assert server.get("/health").status_code == 200
    out = server.openai().completions.create(model="tiny", prompt="still alive?", max_tokens=3)
    assert out.usage.completion_tokens >= 1
    assert "Traceback" not in server.log()
