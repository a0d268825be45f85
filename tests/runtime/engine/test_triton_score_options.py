"""The Triton backend with every per-layer score option gives the torch backend's tokens inside the engine:
a Mistral checkpoint (window 12 on both layers) served past its window in a cache so small that released
blocks are handed to the other sequence at once, plus ALiBi, a soft cap and a custom scale on layer 0 and
a soft cap on layer 1 — eagerly and through the static, padded decode path CUDA graphs replay.

On CPU the kernels run in the Triton interpreter, in a subprocess (TRITON_INTERPRET must be set before
triton is imported); with CUDA the graphs are captured for real.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    from lmforge import LLM, SamplingParams
    from lmforge.kernels.alibi import alibi_slopes
    path, device = sys.argv[1:3]
    if device == "cpu":
        from lmforge.kernels._interp import patch_bf16
        patch_bf16()
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 380, (n,), generator=g).tolist() for n in (30, 17)]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=3)
    result = {}
    for name in ("plain", "torch", "triton", "graphs"):  # plain: torch without the options (the control)
        llm = LLM(path, device=device, dtype="float32", max_model_len=128, num_blocks=10, block_size=4,
                  max_num_batched_tokens=16, max_num_seqs=4,
                  attention_backend="triton" if name in ("triton", "graphs") else "torch",
                  enforce_eager=True)  # graphs below, captured after the options are set
        engine = llm.llm_engine
        assert engine.block_manager.sliding_window == 12
        first, second = engine.runner.model.attention_layers()
        if name != "plain":
            first.alibi_slopes = alibi_slopes(first.num_heads).to(device)
            first.logits_soft_cap, first.scale = 3.0, 0.4
            second.logits_soft_cap = 5.0
        if name == "graphs":  # CPU: the same static, padded forward, eagerly
            engine.runner.prepare_decode_graphs(4, capture=device != "cpu")
        assert (engine.runner.decode_graphs is not None) == (name == "graphs")
        outs = llm.generate(prompts, params)
        result[name] = [[o.outputs[0].token_ids, [{str(k): v for k, v in d.items()} for d in o.outputs[0].logprobs]]
                        for o in outs]
        # 10 blocks hold 40 tokens, the two contexts 63: the run had to hand released blocks out again
        assert engine.block_manager.num_total_blocks * 4 < sum(len(p) + params.max_tokens for p in prompts)
    print("RESULT " + json.dumps(result))
""")


def run_engine(path, device: str) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1" if device == "cpu" else "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-P", "-c", SCRIPT, str(path), device],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from lmforge.runtime.models.tiny import build_tokenizer, tiny_hf_config

    path = tmp_path_factory.mktemp("swa") / "mistral"
    tokenizer = build_tokenizer(384)
    config = tiny_hf_config("mistral", len(tokenizer), initializer_range=0.1, max_position_embeddings=128)
    config.sliding_window = 12
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def assert_same(result: dict, atol: float) -> None:
    assert [t for t, _ in result["plain"]] != [t for t, _ in result["torch"]]  # the options change the tokens
    for other in ("triton", "graphs"):
        for (tokens_a, lps_a), (tokens_b, lps_b) in zip(result["torch"], result[other], strict=True):
            assert tokens_a == tokens_b, other
            for a, b in zip(lps_a, lps_b, strict=True):
                assert all(abs(a[k] - b[k]) < atol for k in a if k in b), other


@pytest.mark.slow
def test_triton_score_options_match_torch_in_interpreter(mistral):
    pytest.importorskip("triton")
    assert_same(run_engine(mistral, "cpu"), atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_score_options_match_torch_on_gpu(mistral):
    assert_same(run_engine(mistral, "cuda"), atol=1e-3)
