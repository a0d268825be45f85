"""A real `lmforge serve` process on a tiny random model, driven by the official openai client."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.slow  # a real server process (torch import + model load)

GREEDY = dict(model="tiny", temperature=0, extra_body={"ignore_eos": True})
METRIC_NAMES = [
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:e2e_request_latency_seconds",
    "vllm:num_preemptions_total",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "lmforge:kv_cache_free_blocks",
]


@pytest.fixture(scope="module")
def client(server):
    return server.openai()


def test_health_models_version(server, client):
    assert server.get("/health").json() == {"status": "ok"}
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert models.data[0].model_extra["max_model_len"] == 256
    assert server.get("/version").json()["version"]


def test_completion_usage_and_length(server, client):
    num_prompt = server.post("/tokenize", json={"prompt": "Hello world"}).json()["count"]
    out = client.completions.create(prompt="Hello world", max_tokens=7, **GREEDY)
    assert out.object == "text_completion" and out.model == "tiny" and len(out.choices) == 1
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        num_prompt,
        7,
        num_prompt + 7,
    )


def test_streamed_completion_equals_non_streamed(client):
    full = client.completions.create(prompt="The quick brown fox", max_tokens=24, **GREEDY)
    chunks = list(
        client.completions.create(
            prompt="The quick brown fox",
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    *body, last = chunks
    assert last.choices == [] and last.usage == full.usage
    assert all(c.usage is None for c in body)


def test_streamed_chat_equals_non_streamed(client):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is a KV cache?"},
    ]
    full = client.chat.completions.create(messages=messages, max_tokens=20, **GREEDY)
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    assert full.usage.completion_tokens == 20
    chunks = list(
        client.chat.completions.create(
            messages=messages,
            max_completion_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    # no include_usage: no usage anywhere
    plain = list(client.chat.completions.create(messages=messages, max_tokens=3, stream=True, **GREEDY))
    assert all(c.usage is None for c in plain)


def test_n_samples_and_completion_logprobs(client):
    out = client.completions.create(
        model="tiny",
        prompt="Hello",
        max_tokens=6,
        n=2,
        logprobs=3,
        seed=7,
        temperature=1.0,
        extra_body={"ignore_eos": True},
    )
    assert sorted(c.index for c in out.choices) == [0, 1]
    assert out.usage.completion_tokens == 12
    for choice in out.choices:
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
        assert all(1 <= len(top) <= 4 for top in lp.top_logprobs)  # top 3 (+ the sampled token)
        assert all(x <= 0.0 for x in lp.token_logprobs)
        assert lp.text_offset == sorted(lp.text_offset)


def test_chat_logprobs_greedy_picks_the_top_token(client):
    out = client.chat.completions.create(
        messages=[{"role": "user", "content": "hi"}], max_tokens=5, logprobs=True, top_logprobs=2, **GREEDY
    )
    content = out.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.bytes == list(entry.token.encode())


def _ascii_window(text: str) -> str | None:
    for start in range(3, len(text) - 2):
        window = text[start : start + 2]
        if window.isascii() and window.strip() == window and window.isprintable():
            return window
    return None


def test_stop_string_truncates_streamed_and_not(client):
    base = client.completions.create(prompt="Hello world", max_tokens=30, **GREEDY).choices[0].text
    stop = _ascii_window(base)
    assert stop is not None, base
    expected = base[: base.index(stop)]
    out = client.completions.create(prompt="Hello world", max_tokens=30, stop=[stop], **GREEDY)
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "stop"
    chunks = list(
        client.completions.create(prompt="Hello world", max_tokens=30, stop=stop, stream=True, **GREEDY)
    )
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_batched_prompts_token_ids_and_echo(server, client):
    single = client.completions.create(prompt="Hello", max_tokens=5, **GREEDY).choices[0].text
    batch = client.completions.create(prompt=["Hello", "Bye"], max_tokens=5, n=2, **GREEDY)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text == single
    ids = server.post("/tokenize", json={"prompt": "Hello"}).json()["tokens"]
    by_ids = client.completions.create(prompt=ids, max_tokens=5, **GREEDY)
    assert by_ids.choices[0].text == single
    echoed = client.completions.create(prompt="Hello", max_tokens=5, echo=True, **GREEDY)
    assert echoed.choices[0].text == "Hello" + single


def _hf_prompt_logprobs(model_dir, prompt: list[int]) -> list[float]:
    """HF transformers' fp32 log_softmax: the logprob of each prompt token after the first."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logprobs = model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
    return [logprobs[i, token].item() for i, token in enumerate(prompt[1:])]


def test_echo_logprobs_score_the_prompt_as_lm_eval_asks(server, client, tiny_model_dir):
    """lm-eval's local-completions: echo + logprobs with max_tokens=1 or 0; the prompt's logprobs
    equal HF transformers' and the first token has none."""
    prompt = server.post("/tokenize", json={"prompt": "The quick brown fox jumps over"}).json()["tokens"]
    one = client.completions.create(prompt=prompt, max_tokens=1, echo=True, logprobs=2, **GREEDY)
    lp = one.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(prompt) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:-1] == pytest.approx(_hf_prompt_logprobs(tiny_model_dir, prompt), abs=1e-4)
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs[1:])
    greedy_token = lp.tokens[-1]
    assert lp.token_logprobs[-1] == pytest.approx(max(lp.top_logprobs[-1].values())) and greedy_token

    zero = client.completions.create(prompt=prompt, max_tokens=0, echo=True, logprobs=2, **GREEDY)
    choice = zero.choices[0]
    assert one.choices[0].text == choice.text + greedy_token  # the prompt alone
    assert (
        choice.logprobs.token_logprobs == lp.token_logprobs[:-1] and choice.logprobs.tokens == lp.tokens[:-1]
    )
    assert choice.finish_reason == "length"
    assert (zero.usage.prompt_tokens, zero.usage.completion_tokens) == (len(prompt), 0)
    vllm_field = choice.model_extra[
        "prompt_logprobs"
    ]  # vLLM's extra: {token id: {logprob, rank, decoded_token}}
    assert len(vllm_field) == len(prompt) and vllm_field[0] is None
    for token, logprob, entry in zip(prompt[1:], lp.token_logprobs[1:], vllm_field[1:], strict=False):
        assert entry[str(token)]["logprob"] == logprob and entry[str(token)]["rank"] >= 1

    repeat = client.completions.create(prompt=prompt, max_tokens=0, echo=True, logprobs=2, **GREEDY)
    assert repeat.choices[0].logprobs == choice.logprobs  # a warm prefix cache changes nothing
    deadline = time.monotonic() + 30
    while server.metric("vllm:num_requests_running") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (
        server.metric("lmforge:kv_cache_free_blocks") == server.metric("lmforge:kv_cache_total_blocks") == 512
    )


def test_streamed_echo_logprobs_equal_non_streamed(client):
    kwargs = dict(prompt="Hello world", max_tokens=4, echo=True, logprobs=1, **GREEDY)
    full = client.completions.create(**kwargs).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kwargs) if c.choices]
    assert "".join(c.text for c in chunks) == full.text
    assert [x for c in chunks for x in c.logprobs.token_logprobs] == full.logprobs.token_logprobs
    assert [x for c in chunks for x in c.logprobs.tokens] == full.logprobs.tokens


def test_prompt_logprobs_extra_field_on_completions_and_chat(client):
    extra = {"ignore_eos": True, "prompt_logprobs": 2}
    out = client.completions.create(
        model="tiny", prompt="Hello world", max_tokens=2, temperature=0, extra_body=extra
    )
    plp = out.choices[0].model_extra["prompt_logprobs"]
    assert len(plp) == out.usage.prompt_tokens and plp[0] is None
    assert all(2 <= len(entry) <= 3 for entry in plp[1:])
    assert out.choices[0].logprobs is None  # no logprobs asked: only vLLM's field
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=2,
        temperature=0,
        extra_body=extra,
    )
    plp = chat.model_extra["prompt_logprobs"]
    assert len(plp) == chat.usage.prompt_tokens and plp[0] is None
    assert all(e["decoded_token"] is not None for entry in plp[1:] for e in entry.values())


def test_seeded_sampling_is_reproducible(client):
    kwargs = dict(
        model="tiny",
        prompt="Numbers:",
        max_tokens=10,
        temperature=1.0,
        top_p=0.9,
        seed=1234,
        extra_body={"top_k": 50, "min_p": 0.001, "ignore_eos": True},
    )
    first = client.completions.create(**kwargs).choices[0].text
    second = client.completions.create(**kwargs).choices[0].text
    assert first == second


def test_concurrent_requests_all_complete(client):
    def one(i: int) -> int:
        out = client.completions.create(prompt=f"Request {i}:", max_tokens=8 + i, **GREEDY)
        return out.usage.completion_tokens

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(one, range(8))) == [8 + i for i in range(8)]


def test_tokenize_detokenize_roundtrip(server):
    tok = server.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()
    assert tok["count"] == len(tok["tokens"]) == len(tok["token_strs"]) and tok["max_model_len"] == 256
    text = server.post("/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"]
    assert text.endswith("Hello world")
    chat = server.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > 2


def test_metrics_names_and_counters_move(server, client):
    text = server.get("/metrics").text
    for name in METRIC_NAMES:
        assert f"\n{name}" in text, name
    assert 'model_name="tiny"' in text
    before = server.metrics()
    prompt = "The quick brown fox jumps over the lazy dog. " * 4  # > 2 blocks: prefix cache at work
    client.completions.create(prompt=prompt, max_tokens=5, **GREEDY)
    client.completions.create(prompt=prompt, max_tokens=5, **GREEDY)
    after = server.metrics()

    def delta(name: str) -> float:
        return after[name + '{model_name="tiny"}'] - before.get(name + '{model_name="tiny"}', 0.0)

    assert delta("vllm:generation_tokens_total") >= 10
    assert delta("vllm:prompt_tokens_total") >= 40
    assert delta("vllm:time_to_first_token_seconds_count") >= 2
    assert delta("vllm:inter_token_latency_seconds_count") >= 8
    assert delta("vllm:e2e_request_latency_seconds_count") >= 2
    assert delta("vllm:prefix_cache_queries_total") >= 32
    assert delta("vllm:prefix_cache_hits_total") >= 16
