"""The LoRA path on the Triton kernel backend (kernels/lora.py shrink/expand on real fused outputs: q/k/v and
gate/up column slices, shard slices of the shrink buffer) gives the torch backend's tokens and logprobs
for one batch mixing two adapters and the base model. On CPU the kernels run in the Triton interpreter,
in a subprocess (TRITON_INTERPRET must be set before triton is imported); with CUDA, on the GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    from lmforge import LLM, LoRARequest, SamplingParams
    device, base, modules = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    prompts = [list(range(5, 14)), [30, 31, 32], list(range(40, 46))]  # past one 8-token block
    loras = [LoRARequest("all16"), None, LoRARequest("qv4")]
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, logprobs=3)
    result = {}
    for backend in ("torch", "triton"):
        llm = LLM(base, device=device, dtype="float32", max_model_len=64, num_blocks=16, block_size=8,
                  attention_backend=backend, enforce_eager=True, enable_lora=True, max_loras=2,
                  lora_modules=modules)
        assert llm.llm_engine.runner.backend.ops.name == backend
        outs = llm.generate(prompts, params, lora_request=loras)
        result[backend] = [[o.outputs[0].token_ids, [{str(k): v for k, v in d.items()} for d in o.outputs[0].logprobs]]
                           for o in outs]
    print("RESULT " + json.dumps(result))
""")


def test_triton_backend_matches_torch_backend(base, adapters):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LMFORGE_KERNEL_BACKEND": ""}
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    modules = {name: str(adapters[name]) for name in ("all16", "qv4")}
    proc = subprocess.run([sys.executable, "-P", "-c", SCRIPT, device, str(base), json.dumps(modules)],
                          capture_output=True, text=True, env=env, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    for row, (ours, ref) in enumerate(zip(result["triton"], result["torch"], strict=True)):
        assert ours[0] == ref[0], f"row {row}: triton tokens {ours[0]} vs torch {ref[0]}"
        for got, want in zip(ours[1], ref[1], strict=True):
            assert got.keys() == want.keys()
            assert max(abs(got[k] - want[k]) for k in got) < 1e-4, row
