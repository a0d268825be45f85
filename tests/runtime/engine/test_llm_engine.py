"""LLMEngine's core API: add_request / step / abort_request / get_stats on a tiny checkpoint."""

from __future__ import annotations

import pytest

from lmforge.runtime.engine.config import EngineArgs
from lmforge.runtime.engine.llm_engine import LLMEngine
from lmforge.runtime.models.tiny import save_tiny_model
from lmforge.runtime.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama")


@pytest.fixture
def make_engine(model_dir):
    def make(**kw) -> LLMEngine:
        args = dict(model=model_dir, device="cpu", dtype="float32", max_model_len=128, num_blocks=64)
        return LLMEngine(EngineArgs(**{**args, **kw}))

    return make


def run_all(engine: LLMEngine) -> dict[str, list]:
    """Steps to completion; request id -> every RequestOutput it produced."""
    seen: dict[str, list] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen.setdefault(out.request_id, []).append(out)
    return seen


def greedy(max_tokens=12, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def test_outputs_are_cumulative_and_finish_with_length(make_engine):
    engine = make_engine(max_num_batched_tokens=8)
    engine.add_request("a", "Hello world, how are you?", greedy(10))
    engine.add_request("b", [5, 6, 7], greedy(4))
    seen = run_all(engine)
    for rid, n in (("a", 10), ("b", 4)):
        outs = seen[rid]
        assert [len(o.outputs[0].token_ids) for o in outs] == list(range(1, n + 1))
        for prev, cur in zip(outs, outs[1:], strict=False):
            assert cur.outputs[0].token_ids[: len(prev.outputs[0].token_ids)] == prev.outputs[0].token_ids
            assert cur.outputs[0].text.startswith(prev.outputs[0].text)
        assert [o.finished for o in outs] == [False] * (n - 1) + [True]
        assert outs[-1].outputs[0].finish_reason == "length"
        assert {"arrival_time", "first_token_time", "finish_time"} <= set(outs[-1].metrics)
    assert seen["a"][0].prompt == "Hello world, how are you?" and seen["b"][0].prompt is None
    stats = engine.get_stats()
    assert stats.generation_tokens_total == 14
    assert stats.prompt_tokens_total == len(seen["a"][0].prompt_token_ids) + 3
    assert stats.num_running == stats.num_waiting == 0 and stats.num_free_blocks == 64


def test_final_only_requests_produce_one_output_with_the_same_result(make_engine):
    engine = make_engine()
    engine.add_request("streamed", [5, 6, 7], greedy(6, logprobs=2))
    engine.add_request("final", [5, 6, 7], greedy(6, logprobs=2, output_kind="final_only"))
    engine.add_request("cut", [5, 6, 7], greedy(50, output_kind="final_only"))
    first = engine.step()
    assert [o.request_id for o in first] == ["streamed"]  # the final_only ones stay quiet
    engine.abort_request("cut")
    seen = run_all(engine)
    assert len(seen["streamed"]) == 5 and len(seen["final"]) == 1 and len(seen["cut"]) == 1
    final, last = seen["final"][0].outputs[0], seen["streamed"][-1].outputs[0]
    assert seen["final"][0].finished and final.token_ids == last.token_ids and final.logprobs == last.logprobs
    assert seen["cut"][0].outputs[0].finish_reason == "abort"
    with pytest.raises(ValueError, match="output_kind"):
        greedy(output_kind="delta")


def test_add_request_validation(make_engine):
    engine = make_engine()
    with pytest.raises(ValueError, match="129 tokens, more than max_model_len=128"):
        engine.add_request("long", list(range(3, 132)), greedy())
    engine.add_request("x", [1, 2], greedy())
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("x", [1, 2], greedy())
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("e", [], greedy())
    with pytest.raises(ValueError, match=r"\[0, 384\)"):
        engine.add_request("v", [384], greedy())
    with pytest.raises(ValueError, match="max_logprobs"):
        engine.add_request("lp", [1], greedy(logprobs=21))
    engine.add_request("fits", list(range(3, 131)), greedy())  # exactly max_model_len: one token
    out = run_all(engine)["fits"][-1]
    assert len(out.outputs[0].token_ids) == 1 and out.outputs[0].finish_reason == "length"


def test_unknown_architecture_and_small_cache_errors(tmp_path, model_dir):
    import json
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["JambaForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ValueError,
        match="JambaForCausalLM.*GPT2LMHeadModel.*LlamaForCausalLM, MiniCPM3ForCausalLM, MistralForCausalLM, .*Qwen2ForCausalLM",
    ):
        LLMEngine(EngineArgs(model=bad, device="cpu", num_blocks=16))
    with pytest.raises(ValueError, match="fewer than max_model_len=128"):
        LLMEngine(EngineArgs(model=model_dir, device="cpu", num_blocks=7, max_model_len=128))
    with pytest.raises(ValueError, match="exceeds the model's limit of 1024"):
        LLMEngine(EngineArgs(model=model_dir, device="cpu", max_model_len=4096))


def test_abort_frees_every_block(make_engine):
    engine = make_engine(num_blocks=24, max_num_seqs=6)
    start = engine.get_stats().num_free_blocks
    for i in range(20):
        engine.add_request(f"r{i}", list(range(3 + i, 40 + i)), greedy(50, n=1 + i % 2))
    for _ in range(5):
        engine.step()
    stats = engine.get_stats()
    assert stats.num_free_blocks < start and stats.kv_cache_usage > 0 and stats.num_waiting > 0
    engine.abort_request([f"r{i}" for i in range(0, 20, 2)])
    engine.abort_request("r1")
    engine.abort_request("no-such-request")
    for _ in range(3):
        engine.step()
    engine.abort_request([f"r{i}" for i in range(20)])
    assert engine.get_stats().num_free_blocks == start
    outs = engine.step()  # the aborts come out as final outputs
    assert {o.request_id for o in outs} <= {f"r{i}" for i in range(20)}
    assert all(o.finished and o.outputs[0].finish_reason == "abort" for o in outs)
    assert not engine.has_unfinished_requests() and engine.step() == []
    stats = engine.get_stats()
    assert stats.num_free_blocks == start and stats.kv_cache_usage == 0.0


def test_stop_string_stop_token_and_eos(make_engine):
    engine = make_engine()
    prompt = "The quick brown fox"
    engine.add_request("base", prompt, greedy(24))
    base = run_all(engine)["base"][-1].outputs[0]
    text, tokens = base.text, base.token_ids
    stop = text[5:8]
    cut = text.index(stop)
    engine.add_request("s", prompt, greedy(24, stop=[stop]))
    outs = run_all(engine)["s"]
    out = outs[-1].outputs[0]
    assert out.text == text[:cut] and out.finish_reason == "stop" and out.stop_reason == stop
    assert all(out.text.startswith(o.outputs[0].text) for o in outs)  # streamed text never overshoots
    assert all(stop not in o.outputs[0].text for o in outs)

    engine.add_request("t", prompt, greedy(24, stop_token_ids=[tokens[6]]))
    out = run_all(engine)["t"][-1].outputs[0]
    first = tokens.index(tokens[6])
    assert out.token_ids == tokens[: first + 1] and out.stop_reason == tokens[6]
    assert out.finish_reason == "stop" and out.text == engine.tokenizer.decode(tokens[:first])

    engine.eos_token_ids = {tokens[3]}  # pretend the model emitted EOS at step 4
    engine.add_request("eos", prompt, SamplingParams(max_tokens=24, temperature=0.0))
    engine.add_request("min", prompt, SamplingParams(max_tokens=24, temperature=0.0, min_tokens=20))
    engine.add_request("ign", prompt, greedy(24))
    seen = run_all(engine)
    eos = seen["eos"][-1].outputs[0]
    first = tokens.index(tokens[3])
    assert eos.token_ids == tokens[: first + 1] and eos.finish_reason == "stop" and eos.stop_reason is None
    assert len(seen["min"][-1].outputs[0].token_ids) >= 20
    assert seen["ign"][-1].outputs[0].token_ids == tokens


def test_seeded_sampling_is_reproducible_in_any_batch(make_engine):
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    engine = make_engine()
    engine.add_request("alone", "Hello", params)
    alone = run_all(engine)["alone"][-1].outputs[0].token_ids
    engine = make_engine(max_num_batched_tokens=6)
    for i in range(3):
        engine.add_request(
            f"noise{i}", f"Some other prompt {i}", SamplingParams(max_tokens=16, temperature=1.0)
        )
    engine.add_request("crowd", "Hello", params)
    crowd = run_all(engine)["crowd"][-1].outputs[0].token_ids
    assert alone == crowd


def test_n_samples_share_prompt_blocks(make_engine):
    engine = make_engine()
    prompt = list(range(3, 60))
    engine.add_request("g", prompt, greedy(8, n=3))
    out = run_all(engine)["g"][-1]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert out.outputs[0].token_ids == out.outputs[1].token_ids == out.outputs[2].token_ids
    assert engine.get_stats().prefix_cache_hits >= 2 * 48  # siblings reused 3 full blocks each
    engine.add_request(
        "s", prompt, SamplingParams(n=2, max_tokens=8, temperature=1.0, seed=1, ignore_eos=True)
    )
    out = run_all(engine)["s"][-1]
    assert out.outputs[0].token_ids != out.outputs[1].token_ids  # seed + index per sample


def test_logprobs_and_cumulative(make_engine):
    engine = make_engine()
    engine.add_request("lp", [5, 6, 7, 8], greedy(6, logprobs=3))
    out = run_all(engine)["lp"][-1].outputs[0]
    assert len(out.logprobs) == 6
    for token, step in zip(out.token_ids, out.logprobs, strict=True):
        assert len(step) == 3 and max(step, key=step.get) == token  # greedy: sampled is the top-1
    assert out.cumulative_logprob == pytest.approx(
        sum(s[t] for t, s in zip(out.token_ids, out.logprobs, strict=True))
    )
