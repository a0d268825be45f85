"""LLM.generate vs Hugging Face transformers on tiny random checkpoints: greedy token ids and
top-5 logprobs (float32, CPU), including chunked prefill, preemption and prefix-cache hits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmforge.runtime import LLM, SamplingParams
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
