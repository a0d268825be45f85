"""A checkpoint from every method loads in transformers (+ compressed-tensors) and in our engine
(QuantLinear / Fp8Linear through ops.quant_linear), with the same greedy tokens and logprobs."""

from __future__ import annotations

import pytest
import torch

from lmforge import LLM, SamplingParams

METHODS = ("w8a16", "w4a16-rtn", "w4a16-gptq", "w4a16-awq", "fp8")  # the `quantized` fixture's runs
MAX_TOKENS = 12
PROMPT = [5, 17, 99, 200, 31, 7, 250, 3, 44, 45, 120, 9]
LOGPROB_ATOL = 1e-4


def hf_greedy(path) -> tuple[list[int], list[torch.Tensor]]:
    """transformers in its default mode (weights decompressed on the first forward; FP8 activations
    fake-quantized per token), full forward at every step."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids, tokens, logprobs = torch.tensor([PROMPT]), [], []
    with torch.no_grad():
        for _ in range(MAX_TOKENS):
            lp = model(ids).logits[0, -1].float().log_softmax(-1)
            logprobs.append(lp)
            tokens.append(int(lp.argmax()))
            ids = torch.cat([ids, torch.tensor([[tokens[-1]]])], dim=1)
    return tokens, logprobs


@pytest.mark.parametrize("method", METHODS)
def test_engine_matches_transformers(quantized, method):
    path = quantized[method].output
    llm = LLM(path, device="cpu", dtype="float32", max_model_len=64, num_blocks=16)
    layer = llm.llm_engine.runner.model.model.layers[0]
    expected = "Fp8Linear" if method == "fp8" else "QuantLinear"
    assert type(layer.self_attn.qkv_proj).__name__ == type(layer.mlp.down_proj).__name__ == expected
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=5, ignore_eos=True)
    completion = llm.generate([PROMPT], params)[0].outputs[0]
    tokens, logprobs = hf_greedy(path)
    assert completion.token_ids == tokens
    for step, ours in enumerate(completion.logprobs):
        for token_id, value in ours.items():
            assert abs(value - float(logprobs[step][token_id])) < LOGPROB_ATOL, (step, token_id)
