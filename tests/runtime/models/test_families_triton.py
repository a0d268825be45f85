"""The new families on the lmforge.kernels Triton backend give the torch backend's tokens and logprobs:
the ops they route through the backend (rms_norm on [T, H, D] q/k heads (Qwen3), partial interleaved
RoPE (GLM), soft-capped sliding-window paged attention with a query_pre_attn_scalar scale (Gemma2))
are the kernels, not the references.

On CPU the kernels run in the Triton interpreter, in a subprocess (TRITON_INTERPRET must be set before
triton is imported); with CUDA the same check runs on the GPU.

The older families (BLOOM, MPT, Falcon-RW: ALiBi paged attention with per-head slopes, MPT's own and
Falcon's bf16-rounded ones divided by sqrt(head_dim); Falcon 7B: multi-query attention, one K/V head)
go through the same comparison.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lmforge.runtime.models.tiny import save_tiny_model
from lmforge.runtime.models.tiny_legacy import save_legacy_tiny_model

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    from lmforge import LLM, SamplingParams
    device, paths = sys.argv[1], json.loads(sys.argv[2])
    prompts = [list(range(5, 35)), [30, 31, 32]]  # 30 tokens: past the 24-token windows
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=3)
    result = {}
    for arch, path in paths.items():
        for backend in ("torch", "triton"):
            llm = LLM(path, device=device, dtype="float32", max_model_len=64, num_blocks=16, block_size=8,
                      max_num_batched_tokens=16, attention_backend=backend, enforce_eager=True)
            outs = llm.generate(prompts, params)
            result[f"{arch}/{backend}"] = [[o.outputs[0].token_ids,
                                            [{str(k): v for k, v in d.items()} for d in o.outputs[0].logprobs]]
                                           for o in outs]
    print("RESULT " + json.dumps(result))
""")


def assert_triton_matches_torch(paths: dict[str, str]) -> None:
    """Runs SCRIPT on each checkpoint with both backends; tokens equal, top-3 logprobs within 1e-4."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LMFORGE_KERNEL_BACKEND": ""}
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, "-P", "-c", SCRIPT, device, json.dumps(paths)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    for arch in paths:
        torch_out, triton_out = result[f"{arch}/torch"], result[f"{arch}/triton"]
        for (t_ids, t_lps), (k_ids, k_lps) in zip(torch_out, triton_out, strict=True):
            assert k_ids == t_ids, arch
            for t_step, k_step in zip(t_lps, k_lps, strict=True):
                for token, lp in t_step.items():
                    assert k_step[token] == pytest.approx(lp, abs=1e-4), arch


@pytest.mark.slow  # ~70 s in the Triton interpreter on 2 busy cores
def test_families_on_the_triton_backend_match_torch(tmp_path):
    assert_triton_matches_torch(
        {
            arch: str(
                save_tiny_model(
                    tmp_path / arch,
                    arch,
                    widen=True,
                    hidden_size=32,
                    num_heads=2,
                    num_kv_heads=1,
                    num_layers=2,
                )
            )
            for arch in ("qwen3", "gemma2", "glm")
        }
    )


@pytest.mark.slow  # ~90 s in the Triton interpreter on 2 busy cores
def test_legacy_families_on_the_triton_backend_match_torch(tmp_path):
    assert_triton_matches_torch(
        {
            arch: str(
                save_legacy_tiny_model(tmp_path / arch, arch, hidden_size=32, num_heads=2, num_layers=2)
            )
            for arch in ("bloom", "mpt", "falcon-rw", "falcon")
        }
    )


@pytest.mark.slow  # ~2 min in the Triton interpreter on 2 busy cores
def test_moe_and_mla_families_on_the_triton_backend_match_torch(tmp_path):
    """Mixtral's experts through the fused MoE kernel; DeepSeek-V3's latent attention (torch, over the
    Triton backend's metadata) with its MoE layer through the kernel."""
    assert_triton_matches_torch(
        {
            arch: str(
                save_tiny_model(
                    tmp_path / arch,
                    arch,
                    widen=True,
                    hidden_size=32,
                    num_heads=2,
                    num_kv_heads=1,
                    num_layers=2,
                )
            )  # fmt: skip
            for arch in ("mixtral", "deepseek_v3")
        }
    )
