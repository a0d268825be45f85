"""task "embed": pooled final hidden states equal Hugging Face's, through chunked prefill, and the
KV blocks come back."""

from __future__ import annotations

import pytest
import torch

from lmforge.runtime.engine.config import EngineArgs
from lmforge.runtime.engine.llm_engine import LLMEngine
from lmforge.runtime.models.tiny import save_tiny_model
from lmforge.runtime.pooling_params import PoolerConfig
from lmforge.runtime.sampling_params import SamplingParams

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hi",
    "Continuous batching mixes prefill chunks with decode steps so that the GPU never idles.",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2", "qwen2")


@pytest.fixture(scope="module")
def hf_hidden(model_dir):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([tok.encode(p)])).last_hidden_state[0] for p in PROMPTS]  # [T, H] each


def embed(engine: LLMEngine) -> list[list[float]]:
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, SamplingParams(max_tokens=1, detokenize=False))
    got = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.finished and out.outputs[0].token_ids == []  # prefill only: nothing sampled
            got[out.request_id] = out.embedding
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_total_blocks
    return [got[str(i)] for i in range(len(PROMPTS))]


@pytest.mark.parametrize("pooling", ["LAST", "MEAN"])
def test_pooled_embeddings_match_hf_through_chunked_prefill(model_dir, hf_hidden, pooling):
    engine = LLMEngine(
        EngineArgs(
            model=model_dir,
            device="cpu",
            dtype="float32",
            max_model_len=128,
            num_blocks=32,
            max_num_batched_tokens=8,
            task="embed",  # 8: long prompts take several steps
            pooler_config=PoolerConfig(pooling),
        )
    )
    for got, hidden in zip(embed(engine), hf_hidden, strict=True):
        ref = hidden[-1] if pooling == "LAST" else hidden.mean(0)
        torch.testing.assert_close(
            torch.tensor(got), torch.nn.functional.normalize(ref, dim=-1), atol=1e-5, rtol=1e-4
        )
    assert embed(engine) == embed(engine)  # deterministic


def test_unnormalized_and_refusals(model_dir, hf_hidden):
    engine = LLMEngine(
        EngineArgs(
            model=model_dir,
            device="cpu",
            dtype="float32",
            max_model_len=128,
            num_blocks=32,
            task="embed",
            pooler_config=PoolerConfig("LAST", normalize=False),
        )
    )
    torch.testing.assert_close(torch.tensor(embed(engine)[0]), hf_hidden[0][-1], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="task 'embed' pools the prompt"):
        engine.add_request("x", "Hi", SamplingParams(n=2))
    with pytest.raises(ValueError, match="pooling_type must be one of LAST, MEAN"):
        PoolerConfig("CLS")
    with pytest.raises(ValueError, match="unknown key.*normalise"):
        PoolerConfig.from_json('{"normalise": true}')
