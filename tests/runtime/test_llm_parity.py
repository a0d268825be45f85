"""LLM.generate vs Hugging Face transformers on tiny random checkpoints: greedy token ids and
top-5 logprobs (float32, CPU), including chunked prefill, preemption and prefix-cache hits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmforge import LLM, SamplingParams
from lmforge.runtime.models.tiny import ARCHS, save_tiny_model

torch.set_num_threads(1)  # the CI box has 2 busy cores: one thread avoids contention

MAX_TOKENS = 32
LOGPROB_ATOL = 1e-3
PARAMS = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=5, ignore_eos=True)


def random_prompts(lengths: list[int], seed: int = 1, vocab: int = 384) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: save_tiny_model(root / arch, arch) for arch in ARCHS}


_hf_cache: dict[tuple[str, tuple[int, ...]], tuple[list[int], list[dict[int, float]]]] = {}


def hf_greedy(path: Path, prompt: list[int]) -> tuple[list[int], list[dict[int, float]]]:
    """Reference: HF forward over the whole sequence at every step (no cache tricks)."""
    key = (str(path), tuple(prompt))
    if key not in _hf_cache:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ids, tokens, top5 = torch.tensor([prompt]), [], []
        with torch.no_grad():
            for _ in range(MAX_TOKENS):
                logprobs = model(ids).logits[0, -1].float().log_softmax(-1)
                values, indices = logprobs.topk(5)
                top5.append(dict(zip(indices.tolist(), values.tolist(), strict=True)))
                tokens.append(int(logprobs.argmax()))
                ids = torch.cat([ids, torch.tensor([[tokens[-1]]])], dim=1)
        _hf_cache[key] = (tokens, top5)
    return _hf_cache[key]


def assert_matches_hf(path: Path, prompts: list[list[int]], outputs) -> None:
    for prompt, out in zip(prompts, outputs, strict=True):
        ref_tokens, ref_top5 = hf_greedy(path, prompt)
        completion = out.outputs[0]
        assert completion.token_ids == ref_tokens
        assert completion.finish_reason == "length"
        for step, (ours, ref) in enumerate(zip(completion.logprobs, ref_top5, strict=True)):
            for token_id, ref_lp in ref.items():
                assert token_id in ours, f"step {step}: top-5 token {token_id} missing"
                assert abs(ours[token_id] - ref_lp) < LOGPROB_ATOL


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_and_logprobs_match_hf(checkpoints, arch):
    prompts = random_prompts([3, 17, 40, 70])
    llm = LLM(checkpoints[arch], device="cpu", dtype="float32", max_model_len=256, num_blocks=64)
    outputs = llm.generate(prompts, PARAMS)
    assert [o.prompt_token_ids for o in outputs] == prompts
    assert_matches_hf(checkpoints[arch], prompts, outputs)


def test_chunked_prefill_matches_hf(checkpoints):
    prompts = random_prompts([5, 40, 70, 23], seed=2)
    llm = LLM(checkpoints["llama31"], device="cpu", dtype="float32", max_model_len=256, num_blocks=64,
              max_num_batched_tokens=16)  # every prompt but one is split; decodes share the steps
    assert_matches_hf(checkpoints["llama31"], prompts, llm.generate(prompts, PARAMS))


def test_preemption_matches_hf(checkpoints):
    prompts = random_prompts([30, 45, 60, 20, 50], seed=3)
    llm = LLM(checkpoints["qwen2"], device="cpu", dtype="float32", max_model_len=128, num_blocks=12,
              block_size=16, enable_prefix_caching=False)
    outputs = llm.generate(prompts, PARAMS)
    assert llm.llm_engine.get_stats().num_preemptions > 0
    assert_matches_hf(checkpoints["qwen2"], prompts, outputs)
    assert llm.llm_engine.get_stats().num_free_blocks == 12


def test_prefix_cache_hits_match_hf(checkpoints):
    prefix = random_prompts([40], seed=4)[0]
    prompts = [prefix + tail for tail in random_prompts([1, 9, 20, 33], seed=5)]
    llm = LLM(checkpoints["llama32"], device="cpu", dtype="float32", max_model_len=256, num_blocks=64,
              block_size=8)
    first = llm.generate(prompts[:1], PARAMS)
    outputs = llm.generate(prompts[1:], PARAMS)  # the 40-token prefix (5 blocks) is cached now
    stats = llm.llm_engine.get_stats()
    assert stats.prefix_cache_hits >= 3 * 40 and all(o.num_cached_tokens == 40 for o in outputs)
    assert_matches_hf(checkpoints["llama32"], prompts, first + outputs)


# --- prompt logprobs ---------------------------------------------------------------------------------

PROMPT_LOGPROB_ATOL = 1e-4
PROMPT_K = 3


def hf_prompt_logprobs(path: Path, prompt: list[int]) -> torch.Tensor:
    """Reference: log_softmax (fp32) of one HF forward over the prompt; row i scores token i + 1."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)


def assert_prompt_logprobs_match_hf(path: Path, prompt: list[int], out, k: int = PROMPT_K) -> None:
    ref = hf_prompt_logprobs(path, prompt)
    got = out.prompt_logprobs
    assert len(got) == len(prompt) and got[0] is None
    for i, (token, entry) in enumerate(zip(prompt[1:], got[1:], strict=True)):
        row = ref[i]
        assert next(iter(entry)) == token  # the prompt token first, then the top k
        assert abs(entry[token].logprob - row[token].item()) < PROMPT_LOGPROB_ATOL, i
        assert entry[token].rank == int((row >= row[token]).sum())
        top_lp, top_ids = row.topk(k)
        for rank, (token_id, lp) in enumerate(zip(top_ids.tolist(), top_lp.tolist(), strict=True), start=1):
            assert token_id in entry, f"position {i}: top-{k} token {token_id} missing"
            assert abs(entry[token_id].logprob - lp) < PROMPT_LOGPROB_ATOL
            if token_id != token:
                assert entry[token_id].rank == rank
        assert len(entry) <= k + 1


@pytest.mark.parametrize("max_num_batched_tokens", [8192, 16], ids=["whole-prompts", "chunked-prefill"])
def test_prompt_logprobs_match_hf(checkpoints, max_num_batched_tokens):
    prompts = random_prompts([2, 17, 40, 70], seed=6)
    llm = LLM(checkpoints["llama31"], device="cpu", dtype="float32", max_model_len=256, num_blocks=64,
              max_num_batched_tokens=max_num_batched_tokens)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=5, ignore_eos=True,
                            prompt_logprobs=PROMPT_K)
    outputs = llm.generate(prompts, params)
    assert_matches_hf(checkpoints["llama31"], prompts, outputs)  # generation is untouched
    for prompt, out in zip(prompts, outputs, strict=True):
        assert_prompt_logprobs_match_hf(checkpoints["llama31"], prompt, out)
    assert llm.llm_engine.get_stats().num_free_blocks == 64


def test_prompt_logprobs_with_a_warm_prefix_cache(checkpoints):
    path = checkpoints["qwen2"]
    prompt = random_prompts([45], seed=7)[0]
    llm = LLM(path, device="cpu", dtype="float32", max_model_len=256, num_blocks=64, block_size=8)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, prompt_logprobs=PROMPT_K)
    plain = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    cold = llm.generate([prompt], params)[0]
    warm_plain = llm.generate([prompt], plain)[0]
    assert warm_plain.num_cached_tokens == 40  # the first request registered its 5 full blocks
    warm = llm.generate([prompt, prompt[:30] + [7, 8]], params)  # both prefixes are cached now
    assert [o.num_cached_tokens for o in warm] == [0, 0]  # prompt logprobs read no cached prefix
    for out, p in ((cold, prompt), (warm[0], prompt), (warm[1], prompt[:30] + [7, 8])):
        assert_prompt_logprobs_match_hf(path, p, out)
    assert warm[0].outputs[0].token_ids == cold.outputs[0].token_ids == warm_plain.outputs[0].token_ids
    assert llm.llm_engine.get_stats().num_free_blocks == 64


def test_prompt_logprobs_survive_preemption_mid_prefill(checkpoints):
    """A long prompt is preempted while its chunks are being scored, then re-admitted: the prefix
    cache may restore only what was scored, and nothing is scored twice."""
    path = checkpoints["llama"]
    engine = LLM(path, device="cpu", dtype="float32", max_model_len=64, num_blocks=8, block_size=8,
                 max_num_batched_tokens=4).llm_engine
    prompt = random_prompts([40], seed=8)[0]
    engine.add_request("decoder", random_prompts([17], seed=9)[0],
                       SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    engine.add_request("scored", prompt, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True,
                                                        prompt_logprobs=PROMPT_K))
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            final[out.request_id] = out
    assert engine.get_stats().num_preemptions > 0
    assert_prompt_logprobs_match_hf(path, prompt, final["scored"])
    assert engine.get_stats().num_free_blocks == 8
