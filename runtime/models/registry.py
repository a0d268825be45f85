"""Architecture name (config.json `architectures[0]`) -> model class (and, for families whose HF config
uses its own key names, the parser that turns it into a ModelConfig)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from lmforge.runtime.models import bloom, falcon, gpt2, mpt, opt
from lmforge.runtime.models.llama import LlamaForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    gpt2.ARCHITECTURE: gpt2.GPT2LMHeadModel,
    opt.ARCHITECTURE: opt.OPTForCausalLM,
    falcon.ARCHITECTURE: falcon.FalconForCausalLM,
    bloom.ARCHITECTURE: bloom.BloomForCausalLM,
    mpt.ARCHITECTURE: mpt.MptForCausalLM,
}

FAMILY_CONFIG_PARSERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    gpt2.ARCHITECTURE: gpt2.config_from_hf,
    opt.ARCHITECTURE: opt.config_from_hf,
    falcon.ARCHITECTURE: falcon.config_from_hf,
    bloom.ARCHITECTURE: bloom.config_from_hf,
    mpt.ARCHITECTURE: mpt.config_from_hf,
}


def get_model_class(architecture: str) -> type[nn.Module]:
    if architecture not in MODEL_REGISTRY:
        raise ValueError(
            f"unsupported model architecture {architecture!r}; supported: {', '.join(sorted(MODEL_REGISTRY))}"
        )
    return MODEL_REGISTRY[architecture]
