"""LLM.generate vs transformers for the sequence-length-dependent RoPE types (longrope, dynamic NTK)
and yarn, on tiny random Llama checkpoints (float32, CPU): greedy tokens and top-5 logprobs.

The reference is HF's own cached generation (one forward for the prompt, then one per token, a fresh
model per prompt): that is what these rope types mean with a KV cache. (HF recomputing the whole
sequence every step gives other numbers for them: every cached key would be re-rotated.)
Prompts sit below, across and above the threshold (longrope: original_max_position_embeddings;
dynamic: max_position_embeddings), also with chunked prefill, prefix-cache hits across regimes and
preemption; negative controls show the comparison fails with the rope scaling removed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge import LLM, SamplingParams
from lmforge.runtime.models.tiny import build_tokenizer

torch.set_num_threads(1)

MAX_TOKENS = 20
LOGPROB_ATOL = 1e-4
PARAMS = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=5, ignore_eos=True)
HEAD_DIM = 16


def _rope(kind: str) -> tuple[dict, int]:
    """(rope_parameters, max_position_embeddings) of each tiny checkpoint."""
    gen = torch.Generator().manual_seed(3)
    if kind == "longrope":
        return {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 32,
                "short_factor": (1 + 0.3 * torch.rand(HEAD_DIM // 2, generator=gen)).tolist(),
                "long_factor": (1 + 12 * torch.rand(HEAD_DIM // 2, generator=gen)).tolist()}, 256  # fmt: skip
    if kind == "dynamic":
        return {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}, 32
    return {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 16,
            "beta_fast": 8.0, "beta_slow": 1.0}, 128  # fmt: skip


def save_rope_model(path: Path, kind: str, *, scaled: bool = True) -> Path:
    """A 2-layer Llama with `kind` rope scaling (scaled=False: the same weights, plain RoPE), weights
    drawn wider than HF's default init (std 1/sqrt(fan_in)) so positions move the logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(384)
    rope, mpe = _rope(kind)
    if not scaled:  # long enough to serve the same prompts
        rope, mpe = {"rope_type": "default", "rope_theta": rope["rope_theta"]}, max(mpe, 128)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=HEAD_DIM, max_position_embeddings=mpe,
                         rope_parameters=rope, bos_token_id=0, eos_token_id=1, pad_token_id=2, rms_norm_eps=1e-5,
                         initializer_range=0.125)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("layernorm.weight") or name == "model.norm.weight":
                    p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rope")
    paths = {kind: save_rope_model(root / kind, kind) for kind in ("longrope", "dynamic", "yarn")}
    paths |= {f"{kind}-plain": save_rope_model(root / f"{kind}-plain", kind, scaled=False)
              for kind in ("longrope", "dynamic", "yarn")}  # fmt: skip
    return paths


def random_prompts(lengths: list[int], seed: int = 1, vocab: int = 300) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


_hf_cache: dict[tuple[str, tuple[int, ...]], tuple[list[int], list[dict[int, float]]]] = {}


def hf_cached_greedy(path: Path, prompt: list[int]) -> tuple[list[int], list[dict[int, float]]]:
    """HF greedy with its KV cache: a prompt forward, then one forward per token (fresh model: HF's
    dynamic rotary keeps state across calls)."""
    key = (str(path), tuple(prompt))
    if key not in _hf_cache:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        tokens, top5, past = [], [], None
        ids = torch.tensor([prompt])
        with torch.no_grad():
            for _ in range(MAX_TOKENS):
                out = model(ids, past_key_values=past, use_cache=True)
                past = out.past_key_values
                logprobs = out.logits[0, -1].float().log_softmax(-1)
                values, indices = logprobs.topk(5)
                top5.append(dict(zip(indices.tolist(), values.tolist(), strict=True)))
                tokens.append(int(logprobs.argmax()))
                ids = torch.tensor([[tokens[-1]]])
        _hf_cache[key] = (tokens, top5)
    return _hf_cache[key]


def mismatches(path: Path, prompts: list[list[int]], outputs) -> list[str]:
    """Every disagreement with HF (empty: tokens equal and top-5 logprobs within LOGPROB_ATOL)."""
    errors = []
    for i, (prompt, out) in enumerate(zip(prompts, outputs, strict=True)):
        ref_tokens, ref_top5 = hf_cached_greedy(path, prompt)
        completion = out.outputs[0]
        if completion.token_ids != ref_tokens:
            errors.append(f"prompt {i} (len {len(prompt)}): tokens {completion.token_ids} != HF {ref_tokens}")
            continue
        for step, (ours, ref) in enumerate(zip(completion.logprobs, ref_top5, strict=True)):
            for token_id, ref_lp in ref.items():
                if token_id not in ours or abs(ours[token_id] - ref_lp) >= LOGPROB_ATOL:
                    errors.append(
                        f"prompt {i} step {step}: token {token_id} {ours.get(token_id)} vs HF {ref_lp}"
                    )
    return errors


# Prompt lengths around each threshold (longrope 32, dynamic 32, yarn: position-only), generating past it.
LENGTHS = {"longrope": [5, 20, 31, 32, 33, 60], "dynamic": [5, 20, 33, 50], "yarn": [5, 30, 70]}
SERVED = {"longrope": 128, "dynamic": 96, "yarn": 128}


@pytest.mark.parametrize("kind", ["longrope", "dynamic", "yarn"])
def test_greedy_and_logprobs_match_hf_generate(checkpoints, kind):
    prompts = random_prompts(LENGTHS[kind])
    llm = LLM(checkpoints[kind], device="cpu", dtype="float32", max_model_len=SERVED[kind], num_blocks=96)
    assert mismatches(checkpoints[kind], prompts, llm.generate(prompts, PARAMS)) == []
    # Negative control: the same weights served with plain RoPE disagree with HF's scaled model.
    plain = LLM(checkpoints[f"{kind}-plain"], device="cpu", dtype="float32", max_model_len=SERVED[kind],
                num_blocks=96)  # fmt: skip
    assert mismatches(checkpoints[kind], prompts, plain.generate(prompts, PARAMS)) != []


@pytest.mark.parametrize("kind", ["longrope", "dynamic"])
def test_chunked_prefill_and_preemption_match_hf(checkpoints, kind):
    prompts = random_prompts(LENGTHS[kind], seed=2)
    chunked = LLM(
        checkpoints[kind],
        device="cpu",
        dtype="float32",
        max_model_len=SERVED[kind],
        num_blocks=96,
        max_num_batched_tokens=16,
    )  # long prompts split into chunks that sit below the threshold
    assert mismatches(checkpoints[kind], prompts, chunked.generate(prompts, PARAMS)) == []
    tight = LLM(
        checkpoints[kind],
        device="cpu",
        dtype="float32",
        max_model_len=80,
        num_blocks=12,
        block_size=8,
        enable_prefix_caching=False,
    )  # recomputed sequences keep their rotations
    outputs = tight.generate(prompts, PARAMS)
    assert tight.llm_engine.get_stats().num_preemptions > 0
    assert mismatches(checkpoints[kind], prompts, outputs) == []


@pytest.mark.parametrize("kind", ["longrope", "dynamic"])
def test_prefix_cache_reuses_blocks_only_with_the_same_rotation(checkpoints, kind):
    """A 24-token prefix computed inside a short prompt is rotated differently from the same tokens inside
    a prompt past the threshold: those blocks must not be shared, while prompts rotated alike share them."""
    prefix = random_prompts([24], seed=4)[0]
    short, long_a, long_b = (prefix + tail for tail in random_prompts([4, 30, 40], seed=5))
    llm = LLM(checkpoints[kind], device="cpu", dtype="float32", max_model_len=SERVED[kind], num_blocks=96,
              block_size=8)  # fmt: skip
    outputs = llm.generate([short], PARAMS)
    outputs += llm.generate([long_a], PARAMS)
    assert outputs[-1].num_cached_tokens == 0  # short-regime blocks are not reused past the threshold
    outputs += llm.generate([long_b], PARAMS)
    # longrope: same regime, the prefix blocks are shared; dynamic: a long prompt's rotation depends on its
    # exact length, so a longer prompt shares nothing with long_a
    assert outputs[-1].num_cached_tokens == (24 if kind == "longrope" else 0)
    assert mismatches(checkpoints[kind], [short, long_a, long_b], outputs) == []
    short_again = llm.generate([prefix + [9, 9]], PARAMS)
    assert short_again[0].num_cached_tokens == 24  # the short prompt's own blocks are still cached
    assert mismatches(checkpoints[kind], [prefix + [9, 9]], short_again) == []


def test_engine_reads_rope_type_from_the_checkpoint(checkpoints):
    config = json.loads((checkpoints["longrope"] / "config.json").read_text())
    assert (config.get("rope_parameters") or config.get("rope_scaling"))["rope_type"] == "longrope"
    llm = LLM(checkpoints["longrope"], device="cpu", dtype="float32", max_model_len=64, num_blocks=16)
    rotary = llm.llm_engine.runner.model.model.rotary_emb
    assert rotary.rope_type == "longrope" and rotary.needs_prompt_lens and rotary.threshold == 32


GRAPH_SCRIPT = """
import json, sys
import torch
torch.set_num_threads(1)
from lmforge import LLM, SamplingParams
path, device, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
llm = LLM(path, device=device, dtype="float32", max_model_len=128, num_blocks=64, block_size=8,
          max_num_batched_tokens=4, max_num_seqs=8, attention_backend="triton", enforce_eager=True)
runner = llm.llm_engine.runner
runner.prepare_decode_graphs(8, capture=device == "cuda")
rows = []
run = runner.decode_graphs.run
def counted(input_ids, *args, run=run):
    rows.append(len(input_ids))
    return run(input_ids, *args)
runner.decode_graphs.run = counted
params = SamplingParams(max_tokens=int(sys.argv[4]), temperature=0.0, logprobs=5, ignore_eos=True)
outs = [[o.outputs[0].token_ids, [{str(k): v for k, v in d.items()} for d in o.outputs[0].logprobs]]
        for o in llm.generate(prompts, params)]
print("RESULT " + json.dumps({"outs": outs, "graph_steps": len(rows)}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_triton_decode_graph_path_matches_hf(checkpoints, device):
    """longrope on the Triton backend through the static decode-graph path (padded rows, the prompt_lens
    row of the input buffer): with a 4-token budget, single prompt tokens of a long prompt ride in
    graph steps next to decodes. CPU: Triton interpreter, graphs run eagerly (capture=False)."""
    import os
    import subprocess
    import sys

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    prompts = random_prompts([6, 12, 9, 40], seed=7)  # then 3 decodes + 1 token of the long prompt per step
    env = {**os.environ, "TRITON_INTERPRET": "1" if device == "cpu" else "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-P", "-c", GRAPH_SCRIPT, str(checkpoints["longrope"]), device,
                           json.dumps(prompts), str(MAX_TOKENS)], env=env, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["graph_steps"] >= 10
    for prompt, (tokens, logprobs) in zip(prompts, result["outs"], strict=True):
        ref_tokens, ref_top5 = hf_cached_greedy(checkpoints["longrope"], prompt)
        assert tokens == ref_tokens
        for ours, ref in zip(logprobs, ref_top5, strict=True):
            assert all(abs(ours[str(t)] - lp) < LOGPROB_ATOL for t, lp in ref.items())
