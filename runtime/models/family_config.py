"""Helpers the older families' config parsers share (GPT-2, OPT, BLOOM, MPT, Falcon): every key that
changes the math is read or refused with a message naming the architecture, the key and the value.

Each family file has `config_from_hf(hf) -> ModelConfig`; what only its graph reads goes into a small
frozen dataclass in `ModelConfig.family`, so the shared ModelConfig keeps the numbers the engine needs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from lmforge.kernels import reference
from lmforge.runtime.models.config import ModelConfig, _as_list
from lmforge.runtime.models.families import HF_ACTIVATIONS


class FamilyConfigError(ValueError):
    """config.json asks for something this family's graph does not implement."""


def require(arch: str, hf: dict[str, Any], key: str) -> Any:
    if hf.get(key) is None:
        raise FamilyConfigError(f"{arch}: config.json lacks {key!r}")
    return hf[key]


def refuse_true(arch: str, hf: dict[str, Any], *keys: str) -> None:
    for key in keys:
        if hf.get(key):
            raise FamilyConfigError(f"{arch}: {key}={hf[key]!r} is not supported")


def refuse_unless(arch: str, key: str, value: Any, allowed: tuple[Any, ...], why: str = "") -> None:
    if value not in allowed:
        expected = " or ".join(repr(a) for a in allowed)
        raise FamilyConfigError(f"{arch}: {key}={value!r} is not supported (expected {expected}){why}")


def activation_fn(arch: str, key: str, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """HF activation name (ACT2FN) -> the shared torch reference (kernels.reference.activation), through
    families.HF_ACTIVATIONS (gelu_new / gelu_pytorch_tanh are the tanh approximation, "gelu" erf-exact)."""
    if name not in HF_ACTIVATIONS:
        raise FamilyConfigError(
            f"{arch}: {key}={name!r} is not supported; supported: {', '.join(HF_ACTIVATIONS)}"
        )
    return functools.partial(reference.activation, act=HF_ACTIVATIONS[name])


def base_config(
    hf: dict[str, Any],
    *,
    architecture: str,
    hidden_size: int,
    num_heads: int,
    num_kv_heads: int,
    num_layers: int,
    intermediate_size: int,
    max_position_embeddings: int,
    tie_word_embeddings: bool,
    family: Any,
) -> ModelConfig:
    """The shared ModelConfig numbers of a family whose HF config uses its own key names."""
    if hidden_size % num_heads:
        raise FamilyConfigError(
            f"{architecture}: hidden size {hidden_size} is not a multiple of {num_heads} heads"
        )
    return ModelConfig(
        architecture=architecture,
        vocab_size=require(architecture, hf, "vocab_size"),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        torch_dtype=hf.get("dtype") or hf.get("torch_dtype"),
        eos_token_ids=_as_list(hf.get("eos_token_id")),
        bos_token_id=hf.get("bos_token_id"),
        family=family,
    )


def rope_from_hf(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling or None) from either layout (transformers 5 `rope_parameters`, 4 `rope_theta` +
    `rope_scaling`); the scaling dict is handed to the shared RotaryEmbedding, which refuses unknown types."""
    rope = dict(hf.get("rope_parameters") or {})
    theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = rope or dict(hf.get("rope_scaling") or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    return theta, None if rope_type == "default" else {**scaling, "rope_type": rope_type}
