"""Architecture name (config.json `architectures[0]`) -> model class: every family of the table
(families.FAMILIES) is served by the one decoder graph."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, cast

import torch
from torch import nn

from lmforge.runtime.models import bloom, falcon, gpt2, mpt, opt
from lmforge.runtime.models.decoder import DecoderForCausalLM
from lmforge.runtime.models.families import FAMILIES

if TYPE_CHECKING:
    from lmforge.runtime.models.layers import PagedAttention
    from lmforge.runtime.models.mla import LatentAttention


class CausalLM(Protocol):
    """What the engine calls on a model beyond nn.Module: every family's *ForCausalLM defines these."""

    def attention_layers(self) -> list[PagedAttention | LatentAttention]: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...


def as_causal_lm(model: nn.Module) -> CausalLM:
    """`model` typed by its engine-facing methods: nn.Module's __getattr__ would type them as
    `Tensor | Module`, so a checker could not see the calls."""
    return cast(CausalLM, model)


MODEL_REGISTRY: dict[str, type[nn.Module]] = dict.fromkeys(FAMILIES, DecoderForCausalLM)
# the older families: one graph file each (their config parsers: config.LEGACY_FAMILY_MODULES)
MODEL_REGISTRY.update(
    {
        gpt2.ARCHITECTURE: gpt2.GPT2LMHeadModel,
        opt.ARCHITECTURE: opt.OPTForCausalLM,
        bloom.ARCHITECTURE: bloom.BloomForCausalLM,
        mpt.ARCHITECTURE: mpt.MptForCausalLM,
        falcon.ARCHITECTURE: falcon.FalconForCausalLM,
    }
)


def get_model_class(architecture: str) -> type[nn.Module]:
    if architecture not in MODEL_REGISTRY:
        raise ValueError(
            f"unsupported model architecture {architecture!r}; supported: {', '.join(sorted(MODEL_REGISTRY))}"
        )
    return MODEL_REGISTRY[architecture]
