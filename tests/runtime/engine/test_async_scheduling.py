"""Async scheduling (step n+1 scheduled and prepared while step n runs, stop checks one step behind)
gives the same outputs, token for token, as the synchronous engine: stop strings, stop token ids, EOS
with min_tokens, max_tokens, seeded sampling (n=2 too), logprobs, aborts and preemption."""

from __future__ import annotations

import pytest

from lmforge.runtime.engine.config import EngineArgs
from lmforge.runtime.engine.llm_engine import LLMEngine
from lmforge.runtime.models.tiny import save_tiny_model
from lmforge.runtime.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama")


def make(model_dir, async_scheduling: bool, **kw) -> LLMEngine:
    args = dict(model=model_dir, device="cpu", dtype="float32", max_model_len=128, num_blocks=64)
    return LLMEngine(EngineArgs(**{**args, **kw}, async_scheduling=async_scheduling))


def run(engine: LLMEngine, requests, abort_after: dict[str, int] | None = None) -> dict[str, tuple]:
    """Adds the requests, steps to completion; aborts a request once its output has N tokens (as a
    client that read them would). Returns request id -> its final output, flattened."""
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = tuple(
                    (o.token_ids, o.text, o.finish_reason, o.stop_reason, o.logprobs) for o in out.outputs
                )
            elif abort_after and len(out.outputs[0].token_ids) >= abort_after.get(out.request_id, 1 << 30):
                engine.abort_request(out.request_id)
    return final


def workload(engine: LLMEngine) -> list[tuple[str, str, SamplingParams]]:
    prompt = "The quick brown fox jumps over"
    g = dict(temperature=0.0, ignore_eos=True)
    base = make_base(engine, prompt)
    return [
        ("len", prompt, SamplingParams(max_tokens=17, **g)),
        ("stop_str", prompt, SamplingParams(max_tokens=30, stop=[base.text[6:9]], **g)),
        ("stop_id", prompt, SamplingParams(max_tokens=30, stop_token_ids=[base.token_ids[5]], **g)),
        ("seeded", "Hello there", SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=3)),
        ("n2", "Once upon", SamplingParams(max_tokens=12, temperature=0.8, seed=11, n=2, ignore_eos=True)),
        ("logprobs", prompt, SamplingParams(max_tokens=9, logprobs=3, **g)),
        ("aborted", "A long story", SamplingParams(max_tokens=40, **g)),
        ("long", "x " * 40, SamplingParams(max_tokens=60, **g)),  # stops at max_model_len
        *[
            (f"more{i}", f"{i} tell me a story about " * 3, SamplingParams(max_tokens=60, **g))
            for i in range(3)
        ],
    ]


_BASE: dict = {}


def make_base(engine: LLMEngine, prompt: str):
    if prompt not in _BASE:
        engine.add_request("base", prompt, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    _BASE[prompt] = out.outputs[0]
    return _BASE[prompt]


def test_same_outputs_with_and_without_async_scheduling(model_dir):
    results, preemptions = [], []
    for async_on in (False, True):
        # 10 blocks x 16 tokens for 9 sequences growing to 20-100 tokens: preemption happens
        engine = make(model_dir, async_on, num_blocks=10)
        assert engine.async_scheduling is async_on
        results.append(run(engine, workload(engine), abort_after={"aborted": 5}))
        preemptions.append(engine.get_stats().num_preemptions)
        assert engine.block_manager.num_free_blocks == 10  # everything given back, aborts included
        assert (engine.runner._worker is not None) is async_on  # the async path really ran
    sync, async_ = results
    assert async_ == sync
    assert min(preemptions) > 0, preemptions
    assert sync["stop_str"][0][2] == "stop" and sync["stop_id"][0][2] == "stop"
    assert sync["len"][0][2] == "length" and len(sync["len"][0][0]) == 17
    assert sync["aborted"][0][2] == "abort" and len(sync["aborted"][0][0]) == 5
    assert len(sync["n2"]) == 2 and sync["n2"][0][0] != sync["n2"][1][0]


def test_eos_and_min_tokens_trail_one_step(model_dir):
    results = []
    for async_on in (False, True):
        engine = make(model_dir, async_on)
        base = make_base(engine, "The quick brown fox jumps over")
        engine.eos_token_ids = {base.token_ids[3]}  # the model "emits EOS" at its 4th token
        results.append(
            run(
                engine,
                [
                    ("eos", "The quick brown fox jumps over", SamplingParams(max_tokens=24, temperature=0.0)),
                    (
                        "min",
                        "The quick brown fox jumps over",
                        SamplingParams(max_tokens=24, temperature=0.0, min_tokens=10),
                    ),
                ],
            )
        )
    assert results[0] == results[1]
    assert results[0]["eos"][0][2] == "stop" and len(results[0]["eos"][0][0]) <= 4


def test_penalties_fall_back_to_synchronous_steps(model_dir):
    """A request whose draw needs the previous token on the host runs its steps synchronously."""
    results = []
    for async_on in (False, True):
        engine = make(model_dir, async_on)
        params = SamplingParams(max_tokens=12, temperature=0.0, repetition_penalty=1.5, ignore_eos=True)
        results.append(
            run(engine, [("pen", "Hello", params), ("plain", "Hello", SamplingParams(max_tokens=12))])
        )
    assert results[0] == results[1]


def test_async_scheduling_is_refused_for_embeddings(model_dir):
    with pytest.raises(ValueError, match="async_scheduling"):
        EngineArgs(model=model_dir, task="embed", async_scheduling=True)


def test_async_scheduling_is_refused_with_tensor_parallelism(model_dir):
    """The workers would run the placeholders rank 0 fills on its own device only."""
    with pytest.raises(ValueError, match="async_scheduling.*tensor_parallel_size=2"):
        EngineArgs(model=model_dir, tensor_parallel_size=2, async_scheduling=True)
    assert EngineArgs(model=model_dir, tensor_parallel_size=2).async_scheduling is None  # resolved: off
