"""A widened tiny Llama and PEFT adapters of it (ranks 4/8/16, attention / MLP / all targets, rslora),
built once per session, plus the HF + PEFT greedy reference every LoRA test compares against."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmforge.runtime.lora.tiny import LLAMA_ATTENTION, LLAMA_MLP, save_tiny_adapter
from lmforge.runtime.models.tiny import save_tiny_model

torch.set_num_threads(1)  # 2 busy cores: one thread avoids contention

MAX_TOKENS = 12
# name -> save_tiny_adapter kwargs: every target set and rank the parity tests cover
ADAPTERS = {
    "attn8": dict(r=8, alpha=16, target_modules=LLAMA_ATTENTION, seed=1),
    "all16": dict(r=16, alpha=32, target_modules=LLAMA_ATTENTION + LLAMA_MLP, seed=2),
    "mlp8rs": dict(r=8, alpha=8, target_modules=LLAMA_MLP, seed=3, use_rslora=True),
    "qv4": dict(r=4, alpha=8, target_modules=("q_proj", "v_proj"), seed=4),
}


class Adapters(dict):
    def __init__(self, root: Path, base: Path):
        super().__init__()
        self.root, self.base = root, base

    def __missing__(self, name: str) -> Path:
        self[name] = path = save_tiny_adapter(self.base, self.root / name, **ADAPTERS[name])
        return path


@pytest.fixture(scope="session")
def base(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("lora-base") / "llama", "llama", widen=True)


@pytest.fixture(scope="session")
def adapters(tmp_path_factory, base) -> Adapters:
    return Adapters(tmp_path_factory.mktemp("adapters"), base)


_models: dict[tuple[str, str | None], torch.nn.Module] = {}
_greedy: dict[tuple[str, str | None, tuple[int, ...]], tuple[list[int], torch.Tensor]] = {}


def hf_model(base: Path, adapter: Path | None) -> torch.nn.Module:
    """transformers' model of `base` (decompressed first when quantized), with PEFT's adapter on top."""
    key = (str(base), None if adapter is None else str(adapter))
    if key not in _models:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        with torch.no_grad():
            model(torch.tensor([[1, 2]]))  # compressed-tensors checkpoints decompress on the first forward
        _models[key] = model if adapter is None else PeftModel.from_pretrained(model, adapter).eval()
    return _models[key]


def hf_greedy(base: Path, adapter: Path | None, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    """HF (+ PEFT) greedy decoding, a full forward per step: (MAX_TOKENS ids, log_softmax rows)."""
    key = (str(base), None if adapter is None else str(adapter), tuple(prompt))
    if key not in _greedy:
        model, ids, tokens, rows = hf_model(base, adapter), list(prompt), [], []
        with torch.no_grad():
            for _ in range(MAX_TOKENS):
                rows.append(model(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1))
                tokens.append(int(rows[-1].argmax()))
                ids.append(tokens[-1])
        _greedy[key] = (tokens, torch.stack(rows))
    return _greedy[key]


def mismatch(base: Path, adapter: Path | None, prompt: list[int], completion) -> tuple[int | None, float]:
    """(first step whose token differs from HF + PEFT's, or None; max |logprob - HF| up to there)."""
    ref_tokens, ref_rows = hf_greedy(base, adapter, prompt)
    worst = 0.0
    for step, (token, ours) in enumerate(zip(completion.token_ids, completion.logprobs, strict=True)):
        worst = max(worst, *(abs(lp - ref_rows[step][t].item()) for t, lp in ours.items()))
        if token != ref_tokens[step]:
            return step, worst
    return None, worst


def random_prompts(lengths: list[int], seed: int = 1, vocab: int = 384) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
