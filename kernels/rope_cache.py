"""RoPE frequency table: inverse frequencies (plain, linear, Llama-3.1 scaling) and the cos/sin cache.

Torch only, no Triton: the model loader builds the cache once per model on any device. The
cache layout is what `rope.py` (Triton) and `reference.rope` read:

    cos_sin_cache [max_positions, rotary_dim] fp32: columns [0, rotary_dim/2) hold cos(pos * inv_freq),
    columns [rotary_dim/2, rotary_dim) hold sin(pos * inv_freq).
"""

from __future__ import annotations

import math
from typing import Any

import torch


def compute_inv_freq(rotary_dim: int, base: float, rope_scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """inv_freq [rotary_dim/2] fp32, bit-identical to transformers' ROPE_INIT_FUNCTIONS for the supported types.

    rope_scaling: None / {"rope_type": "default"} (plain), {"rope_type": "linear", "factor"},
    {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"} (Llama 3.1/3.2). The older key "type" is accepted too.
    """
    if rotary_dim % 2:
        raise ValueError(f"rotary_dim must be even, got {rotary_dim}")
    # Same op order as transformers (int64 arange -> fp32 -> / dim; python-float base ** tensor).
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(torch.float) / rotary_dim
    inv_freq = 1.0 / (base**exponents)
    scaling = dict(rope_scaling or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise NotImplementedError(f"rope_scaling type {rope_type!r} is not supported (default, linear, llama3)")


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by `factor`, blend smoothly in between."""
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor  # longer wavelengths than this: fully scaled
    high_freq_wavelen = old_context_len / high_freq_factor  # shorter than this: untouched

    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


def build_rope_cache(
    rotary_dim: int,
    max_positions: int,
    base: float = 10000.0,
    rope_scaling: dict[str, Any] | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """cos_sin_cache [max_positions, rotary_dim] fp32 (cos half, then sin half)."""
    inv_freq = compute_inv_freq(rotary_dim, base, rope_scaling)
    positions = torch.arange(max_positions, dtype=torch.float)
    freqs = torch.outer(positions, inv_freq)  # [max_positions, rotary_dim/2]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)
