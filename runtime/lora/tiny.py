"""Tiny random PEFT adapters for tests, benchmarks and demos (the LoRA twin of models/tiny.py).

PEFT initialises lora_B to zero (an untrained adapter changes nothing), so every weight here is widened:
A ~ N(0, 1/in), B ~ N(0, b_std^2 / r), deterministic in `seed`. Written by PEFT itself
(`save_pretrained`), so the files are exactly what a user's fine-tune produces.
"""

from __future__ import annotations

from pathlib import Path

import torch

LLAMA_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
LLAMA_MLP = ("gate_proj", "up_proj", "down_proj")


def save_tiny_adapter(base: str | Path, path: str | Path, *, r: int = 8, alpha: int = 16,
                      target_modules: tuple[str, ...] = LLAMA_ATTENTION, seed: int = 0, b_std: float = 1.0,
                      use_rslora: bool = False) -> Path:  # fmt: skip
    """Writes a PEFT LoRA adapter of the checkpoint at `base` to `path`; returns the path."""
    import peft
    from transformers import AutoModelForCausalLM

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        lora_dropout=0.0,
        use_rslora=use_rslora,
        task_type="CAUSAL_LM",
    )
    peft_model = peft.get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name:
                param.copy_(torch.randn(param.shape, generator=g) / param.shape[1] ** 0.5)
            elif "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * b_std / param.shape[1] ** 0.5)
    peft_model.save_pretrained(str(path))
    return path
