"""The engine serves prompts longer than the sliding window and matches transformers token for token,
with window-sized KV: Mistral (every layer slides), through chunked prefill, prefix-cache hits and
preemption; a Qwen2 layout with one global layer (per-layer windows, nothing freed); and a negative
control (the window removed) that must fail. float32 on CPU, the torch attention backend."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lmforge.runtime.engine.block_manager import max_blocks_per_seq
from lmforge.runtime.engine.config import EngineArgs
from lmforge.runtime.engine.llm_engine import LLMEngine
from lmforge.runtime.models.tiny import build_tokenizer, tiny_hf_config
from lmforge.runtime.sampling_params import SamplingParams

WINDOW, BS, MAX_TOKENS = 12, 4, 20
LOGPROB_ATOL = 1e-4


def save_windowed(path: Path, arch: str, **overrides) -> Path:
    """A tiny random checkpoint with widened weights (std 0.1: windows change tokens, not only logits)."""
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer(384)
    config = tiny_hf_config(arch, len(tokenizer), initializer_range=0.1, max_position_embeddings=256)
    for key, value in overrides.items():
        setattr(config, key, value)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def mistral(tmp_path_factory) -> Path:
    return save_windowed(tmp_path_factory.mktemp("swa") / "mistral", "mistral", sliding_window=WINDOW)


def prompts(lengths: list[int], seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 380, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(path: Path, prompt: list[int], **config_overrides) -> tuple[list[int], list[dict[int, float]]]:
    """transformers' own model over the whole sequence at every step (its own sliding-window mask)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32).eval()
    ids, tokens, top5 = torch.tensor([prompt]), [], []
    with torch.no_grad():
        for _ in range(MAX_TOKENS):
            logprobs = model(ids).logits[0, -1].float().log_softmax(-1)
            values, indices = logprobs.topk(5)
            top5.append(dict(zip(indices.tolist(), values.tolist(), strict=True)))
            tokens.append(int(logprobs.argmax()))
            ids = torch.cat([ids, torch.tensor([[tokens[-1]]])], dim=1)
    return tokens, top5


def matches(
    ref: tuple[list[int], list[dict[int, float]]], token_ids: list[int], logprobs: list[dict]
) -> bool:
    ref_tokens, ref_top5 = ref
    if token_ids != ref_tokens:
        return False
    return all(
        abs(ours[t] - lp) < LOGPROB_ATOL
        for ours, theirs in zip(logprobs, ref_top5, strict=True)
        for t, lp in theirs.items()
    )


def run(engine: LLMEngine, batch: list[list[int]], tag: str) -> tuple[dict[str, tuple], dict[str, int]]:
    """Generates greedily, step by step; returns outputs by request and the most blocks any sequence held
    right after a step's allocation: {"decode": for a 1-token step, "any": for any step}."""
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=5, ignore_eos=True)
    for i, prompt in enumerate(batch):
        engine.add_request(f"{tag}{i}", prompt, params)
    schedule, steps = engine.scheduler.schedule, []

    def observed_schedule():  # the real scheduler, only watched: which sequences ran which chunk
        steps.append(schedule())
        return steps[-1]

    engine.scheduler.schedule = observed_schedule
    outputs, held = {}, {"decode": 0, "any": 0}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = (
                    out.outputs[0].token_ids,
                    out.outputs[0].logprobs,
                    out.num_cached_tokens,
                )
        for s in steps[-1].scheduled if steps else ():
            n = engine.block_manager.num_held_blocks(s.seq)
            held["any"] = max(held["any"], n)
            if s.num_new_tokens == 1:
                held["decode"] = max(held["decode"], n)
    engine.scheduler.schedule = schedule
    return outputs, held


def test_mistral_past_the_window_matches_hf_with_window_sized_kv(mistral):
    batch = prompts([30, 45, 9, 26])  # three longer than the window; mixed lengths in one batch
    refs = [hf_greedy(mistral, p) for p in batch]
    engine = LLMEngine(
        EngineArgs(
            model=mistral,
            device="cpu",
            dtype="float32",
            block_size=BS,
            num_blocks=12,
            max_num_batched_tokens=16,
            max_num_seqs=4,
        )
    )  # 65 tokens would be 17 blocks each
    assert engine.model_config.max_model_len == 256  # not clamped to the window
    assert engine.block_manager.sliding_window == WINDOW
    outputs, held = run(engine, batch, "a")
    assert (
        held["decode"] <= max_blocks_per_seq(256, BS, WINDOW, 1) == 4
    )  # window / block_size + 1, not 65 / 4
    assert (
        held["any"] <= max_blocks_per_seq(256, BS, WINDOW, 16) == 8
    )  # a 16-token chunk on top of the window
    for i, ref in enumerate(refs):
        assert matches(ref, *outputs[f"a{i}"][:2]), f"prompt {i}"
    assert engine.get_stats().num_preemptions > 0  # 4 decodes x 4 blocks do not fit 12 blocks

    # the same prompts again: prefix-cache hits on blocks released earlier (still hashed) or kept
    again, _ = run(engine, batch, "b")
    assert sum(out[2] for out in again.values()) > 0
    for i, ref in enumerate(refs):
        assert matches(ref, *again[f"b{i}"][:2]), f"prompt {i} (prefix hit)"


def test_negative_control_without_the_window_differs_from_hf(mistral, tmp_path):
    """The same weights served without the window attend to the whole context: HF-with-window disagrees."""
    plain = tmp_path / "no-window"
    shutil.copytree(mistral, plain)
    cfg = json.loads((plain / "config.json").read_text())
    cfg["sliding_window"] = None
    (plain / "config.json").write_text(json.dumps(cfg))
    batch = prompts([30, 45])
    engine = LLMEngine(EngineArgs(model=plain, device="cpu", dtype="float32", block_size=BS, num_blocks=64))
    assert engine.block_manager.sliding_window is None
    outputs, _ = run(engine, batch, "c")
    assert not any(matches(hf_greedy(mistral, p), *outputs[f"c{i}"][:2]) for i, p in enumerate(batch))


def test_per_layer_windows_with_a_global_layer_match_hf_and_free_nothing(tmp_path):
    """Qwen2 with use_sliding_window and max_window_layers=1: layer 0 global, layer 1 slides (HF layer_types).
    Our engine loads the checkpoint without windows and gets layer 1's window set on its PagedAttention
    (the per-layer config parse belongs to the model-zoo branch); one global layer keeps every block."""
    path = save_windowed(tmp_path / "qwen2", "qwen2")
    batch = prompts([33, 20], seed=5)
    engine = LLMEngine(
        EngineArgs(
            model=path,
            device="cpu",
            dtype="float32",
            block_size=BS,
            num_blocks=40,
            max_model_len=64,
            max_num_batched_tokens=16,
        )
    )
    layers = engine.runner.model.attention_layers()
    layers[1].sliding_window = WINDOW
    assert engine.block_manager.sliding_window is None  # a global layer: nothing can be freed
    outputs, held = run(engine, batch, "d")
    assert held["decode"] == -(-(33 + MAX_TOKENS - 1) // BS)  # the whole context stays
    hf_windows = dict(
        use_sliding_window=True,
        sliding_window=WINDOW,
        max_window_layers=1,
        layer_types=["full_attention", "sliding_attention"],
    )
    for i, p in enumerate(batch):
        assert matches(hf_greedy(path, p, **hf_windows), *outputs[f"d{i}"][:2]), f"prompt {i}"
        assert not matches(hf_greedy(path, p), *outputs[f"d{i}"][:2])  # the window on layer 1 mattered
