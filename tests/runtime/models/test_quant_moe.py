"""W8A16 / W4A16 MoE checkpoints: `lmforge quantize` packs every expert projection (per expert, round to
nearest) and leaves the routers dense; the engine loads the packed experts into QuantFusedMoE and runs
the same fused MoE op. Reference: transformers on the same checkpoint dequantized to a dense one (its
compressed-tensors loader has no per-expert Linears to put the packed experts in): greedy tokens equal,
logprobs to 1e-4."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge import LLM, SamplingParams
from lmforge.kernels.quant_pack import dequantize_weight
from lmforge.runtime.models.tiny import save_tiny_model
from lmforge.runtime.quantize import main

PROMPT = list(range(5, 45))
MAX_TOKENS = 8


def quantize(source: Path, output: Path, method: str) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["--model", str(source), "--method", method, "--output", str(output), "--group-size", "8",
                     "--eval-samples", "2", "--eval-seq-len", "32"]) == 0  # fmt: skip
    return json.loads((output / "config.json").read_text())


def dense_copy(quantized: Path, out: Path) -> Path:
    """The quantized checkpoint with every packed weight dequantized (fp32) and no quantization_config."""
    out.mkdir()
    tensors = load_file(quantized / "model.safetensors")
    dense = {}
    for name, tensor in tensors.items():
        if name.endswith(".weight_packed"):
            module = name.removesuffix(".weight_packed")
            shape = tuple(tensors[f"{module}.weight_shape"].tolist())
            bits = 32 * tensor.shape[1] // shape[1]
            dense[f"{module}.weight"] = dequantize_weight(
                tensor, tensors[f"{module}.weight_scale"].float(), bits, shape
            )
        elif not name.endswith((".weight_scale", ".weight_shape")):
            dense[name] = tensor.float()
    save_file(dense, out / "model.safetensors")
    for side in quantized.iterdir():
        if side.name not in ("model.safetensors", "config.json") and side.is_file():
            (out / side.name).write_bytes(side.read_bytes())
    config = json.loads((quantized / "config.json").read_text())
    config.pop("quantization_config")
    (out / "config.json").write_text(json.dumps({**config, "dtype": "float32"}))
    return out


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


@pytest.mark.parametrize("method", ["w8a16", "w4a16-rtn"])
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "phimoe", "deepseek_v2", "deepseek_v3"])
def test_quantized_experts_match_their_dequantized_reference(tmp_path, arch, method):
    source = save_tiny_model(tmp_path / arch, arch, widen=True)
    output = tmp_path / f"{arch}-{method}"
    config = quantize(source, output, method)
    names = load_file(output / "model.safetensors").keys()
    assert any(".experts.1." in n and n.endswith("weight_packed") for n in names)  # experts are packed
    routers = [n for n in names if n.endswith((".gate.weight", "shared_expert_gate.weight"))]
    assert routers and all(not n.endswith("weight_packed") for n in names if ".gate." in n)  # routers are not
    assert any(p.startswith("re:") and "gate" in p for p in config["quantization_config"]["ignore"])

    llm = LLM(output, device="cpu", dtype="float32", max_model_len=128, num_blocks=32)
    sparse = [
        layer.mlp for layer in llm.llm_engine.runner.model.model.layers if hasattr(layer.mlp, "experts")
    ]
    assert sparse and all(type(m.experts).__name__ == "QuantFusedMoE" for m in sparse)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=5, ignore_eos=True)
    completion = llm.generate([PROMPT], params)[0].outputs[0]
    tokens, rows = hf_greedy(dense_copy(output, tmp_path / "dense"))
    assert completion.token_ids == tokens
    for step, ours in enumerate(completion.logprobs):
        for token_id, value in ours.items():
            assert abs(value - rows[step][token_id].item()) < 1e-4, (step, token_id)
    # the quantization moved the model: the reference is not simply the original checkpoint
    _, original_rows = hf_greedy(source)
    assert (original_rows[0] - rows[0]).abs().max().item() > 1e-3
