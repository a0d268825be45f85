"""LLM(tensor_parallel_size=2) end to end on CPU: worker processes, the per-step StepInputs message over
both transports, rank 0 sampling. Greedy and seeded sampled tokens, logprobs and prompt logprobs (several
LM-head calls per step: the chunks every rank must make alike) equal one rank's under chunked prefill
mixed with decodes; the older families are refused before any worker starts; a hung worker (SIGSTOP)
fails the step within the step timeout instead of hanging."""

from __future__ import annotations

import os
import signal
import time

import pytest

from lmforge import LLM, SamplingParams
from lmforge.runtime.engine.tp_executor import WorkerFailedError
from lmforge.runtime.models.tiny import save_tiny_model
from lmforge.runtime.models.tiny_legacy import save_legacy_tiny_model

pytestmark = pytest.mark.slow  # worker processes: a torch import and a model load each
ATOL = 1e-4
PROMPTS = [
    "The quick brown fox jumps over the lazy dog. A paged KV cache stores keys and values in blocks.",
    "Hello world! How are you today?",
    "Kubernetes operators reconcile the desired state with the actual state of the cluster.",
]
PARAMS = [
    SamplingParams(max_tokens=10, temperature=0.0, logprobs=3, prompt_logprobs=2, ignore_eos=True),
    SamplingParams(max_tokens=10, temperature=0.0, logprobs=1, ignore_eos=True),
    SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=7, logprobs=2, ignore_eos=True),
]
ENGINE = dict(device="cpu", dtype="float32", max_model_len=128, num_blocks=64, max_num_batched_tokens=24)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tp-engine") / "llama", "llama", widen=True)


@pytest.fixture(scope="module")
def reference(model):
    with LLM(model, **ENGINE) as llm:
        return llm.generate(PROMPTS, PARAMS)


def _close(a: dict, b: dict) -> bool:
    """Two {token id: logprob or Logprob} entries: the same ids, values within ATOL."""

    def value(x) -> float:
        return x if isinstance(x, float) else x.logprob

    return a.keys() == b.keys() and all(abs(value(a[k]) - value(b[k])) < ATOL for k in a)


@pytest.mark.parametrize("channel", ["shm", "broadcast"])
def test_tp2_generates_what_one_rank_generates(model, reference, channel):
    with LLM(model, **ENGINE, tensor_parallel_size=2, tp_channel=channel) as llm:
        assert llm.llm_engine.tp_driver is not None and len(llm.llm_engine.tp_driver.pids) == 1
        outputs = llm.generate(PROMPTS, PARAMS)
    for ours, ref in zip(outputs, reference, strict=True):
        assert ours.outputs[0].token_ids == ref.outputs[0].token_ids
        for a, b in zip(ours.outputs[0].logprobs, ref.outputs[0].logprobs, strict=True):
            assert _close(a, b)
        if ref.prompt_logprobs is not None:
            assert all(
                _close(a, b) for a, b in zip(ours.prompt_logprobs[1:], ref.prompt_logprobs[1:], strict=True)
            )


def test_older_families_are_refused_before_any_worker_starts(tmp_path):
    path = save_legacy_tiny_model(tmp_path / "gpt2", "gpt2")
    with pytest.raises(ValueError, match="tensor_parallel_size > 1 is not supported for GPT2LMHeadModel"):
        LLM(path, device="cpu", dtype="float32", tensor_parallel_size=2)


def test_a_hung_worker_fails_the_step_instead_of_hanging(model):
    with LLM(model, **ENGINE, tensor_parallel_size=2, tp_timeout_s=3.0) as llm:
        (worker,) = llm.llm_engine.tp_driver.pids
        os.kill(worker, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(WorkerFailedError, match="no progress in 3s"):
            llm.generate(PROMPTS[:1], PARAMS[1])
        assert time.monotonic() - started < 30


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3", "minicpm3"])
def test_mla_families_are_refused_until_latent_attention_is_sharded(tmp_path, family):
    """Unsplit latent attention behind a row-parallel all-reduce would be summed once per rank: refused
    by name before any worker starts. (The MoE families split by expert: test_tensor_parallel.py.)"""
    path = save_tiny_model(tmp_path / family, family)
    with pytest.raises(ValueError, match="tensor_parallel_size > 1 is not supported .*latent attention"):
        LLM(path, device="cpu", dtype="float32", tensor_parallel_size=2)


def test_moe_experts_that_do_not_divide_over_the_ranks_are_refused(tmp_path):
    path = save_tiny_model(tmp_path / "mixtral", "mixtral", config_overrides={"num_local_experts": 6})
    with pytest.raises(ValueError, match="tensor_parallel_size=4: num_local_experts=6 is not divisible"):
        LLM(path, device="cpu", dtype="float32", tensor_parallel_size=4)
