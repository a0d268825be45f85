"""The engine on the lmforge.kernels Triton backend gives the torch backend's tokens, also through
the static, padded decode path that CUDA graphs replay.

On CPU the kernels run in the Triton interpreter, in a subprocess (TRITON_INTERPRET must be set
before triton is imported), and the decode-graph path runs its padded forward eagerly; with CUDA
the same check runs on the GPU with the graphs captured (and with enforce_eager for comparison).
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

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    from lmforge import LLM, SamplingParams
    path, device, dtype = sys.argv[1:4]
    if device == "cpu":
        from lmforge.kernels._interp import patch_bf16
        patch_bf16()
    prompts = [list(range(5, 24)), [30, 31, 32], [40] * 9]
    # different lengths: the decode batch shrinks 3 -> 2 -> 1 (padded size 4, then 2, then 1)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=3) for n in (6, 3, 4)]
    result = {}
    graph_steps = 0
    for name in ("torch", "triton", "graphs"):
        llm = LLM(path, device=device, dtype=dtype, max_model_len=64, num_blocks=16, block_size=8,
                  max_num_batched_tokens=16, max_num_seqs=8, attention_backend="torch" if name == "torch" else "triton",
                  enforce_eager=name != "graphs")  # chunked prefill + decode mixed
        runner = llm.llm_engine.runner
        if name == "graphs":
            if device == "cpu":
                runner.prepare_decode_graphs(8, capture=False)  # sizes 1, 2, 4, 8: 3 rows pad to 4
            assert runner.decode_graphs is not None and (device == "cpu" or runner.decode_graphs.graphs)
            run = runner.decode_graphs.run
            def counted(*args, run=run):
                global graph_steps
                graph_steps += 1
                return run(*args)
            runner.decode_graphs.run = counted
        else:
            assert runner.decode_graphs is None
        outs = llm.generate(prompts, params)
        result[name] = [[o.outputs[0].token_ids, [{str(k): v for k, v in d.items()} for d in o.outputs[0].logprobs]]
                           for o in outs]
    assert graph_steps >= 3, graph_steps  # the decode steps went through the padded static path
    print("RESULT " + json.dumps(result))
""")


def run_both(path, device: str, dtype: str) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1" if device == "cpu" else "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-P", "-c", SCRIPT, str(path), device, dtype],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def assert_same(result: dict, atol: float) -> None:
    for other in ("triton", "graphs"):
        for (tokens_a, lps_a), (tokens_b, lps_b) in zip(result["torch"], result[other], strict=True):
            assert tokens_a == tokens_b, other
            for a, b in zip(lps_a, lps_b, strict=True):
                assert all(abs(a[k] - b[k]) < atol for k in a if k in b), other


@pytest.mark.slow
def test_triton_backend_matches_torch_in_interpreter(tmp_path):
    pytest.importorskip("triton")
    path = save_tiny_model(tmp_path / "m", "llama")
    assert_same(run_both(path, "cpu", "float32"), atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_backend_matches_torch_on_gpu(tmp_path):
    path = save_tiny_model(tmp_path / "m", "qwen2")
    assert_same(run_both(path, "cuda", "float32"), atol=1e-3)
