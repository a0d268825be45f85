"""W8A16 / W4A16 (RTN) checkpoints of every family: `lmforge quantize` writes compressed-tensors,
transformers (+ compressed-tensors) decompresses them, and our engine (QuantLinear through
ops.quant_linear, the checkpoint's fused or per-head-interleaved layouts routed into our stacked rows)
gives HF's greedy tokens and logprobs to 1e-4. One tiny checkpoint per family (runtime/models/tiny.py);
34 runs in ~45 s on 2 busy cores."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from lmforge import LLM, SamplingParams
from lmforge.runtime.models.tiny import TINY_SPECS, save_tiny_model
from lmforge.runtime.quantize import main

# MoE and MLA families: tests/runtime/models/test_quant_moe.py (transformers keeps their experts as stacked
# parameters, so its compressed-tensors loader is no reference for quantized experts)
_SPARSE = {"mixtral", "qwen2_moe", "phimoe", "deepseek_v2", "deepseek_v3", "minicpm3", "dbrx"}
FAMILY_ARCHS = sorted(
    {
        model_type: name
        for name, (model_type, _) in reversed(TINY_SPECS.items())
        if model_type not in _SPARSE
    }.values()
)
METHODS = ("w8a16", "w4a16-rtn")
PROMPT = list(range(5, 45))  # past the 20-24-token windows
MAX_TOKENS = 8
LOGPROB_ATOL = 1e-4


@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {"text": f"document {i}: the cat sat on the mat while the operator reconciled the job"}
            )
            + "\n"
            for i in range(8)
        )
    )
    return path


def hf_greedy(path: Path) -> tuple[list[int], list[torch.Tensor]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokens, rows = [], []
    with torch.no_grad():
        out = model(torch.tensor([PROMPT]), use_cache=True)
        for _ in range(MAX_TOKENS):
            rows.append(out.logits[0, -1].float().log_softmax(-1))
            tokens.append(int(rows[-1].argmax()))
            out = model(torch.tensor([[tokens[-1]]]), cache=out.cache, use_cache=True)
    return tokens, rows


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_quantized_family_matches_transformers(tmp_path, calibration, arch, method):
    source = save_tiny_model(tmp_path / arch, arch, widen=True)
    output = tmp_path / f"{arch}-{method}"
    with contextlib.redirect_stdout(io.StringIO()):
        assert (
            main(
                [
                    "--model",
                    str(source),
                    "--method",
                    method,
                    "--output",
                    str(output),
                    "--group-size",
                    "32",
                    "--calibration",
                    str(calibration),
                    "--samples",
                    "4",
                    "--seq-len",
                    "32",
                    "--eval-samples",
                    "2",
                    "--eval-seq-len",
                    "32",
                ]
            )
            == 0
        )
    llm = LLM(output, device="cpu", dtype="float32", max_model_len=128, num_blocks=32)
    layer = llm.llm_engine.runner.model.model.layers[0]
    assert type(layer.self_attn.qkv_proj).__name__ == type(layer.mlp.down_proj).__name__ == "QuantLinear"
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=5, ignore_eos=True)
    completion = llm.generate([PROMPT], params)[0].outputs[0]
    tokens, rows = hf_greedy(output)
    assert completion.token_ids == tokens
    for step, ours in enumerate(completion.logprobs):
        for token_id, value in ours.items():
            assert abs(value - rows[step][token_id].item()) < LOGPROB_ATOL, (step, token_id)
