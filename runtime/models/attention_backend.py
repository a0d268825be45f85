"""The attention interface a model layer calls: what `PagedAttention` needs from whichever backend runs it.

It lives with the models (they consume it) and the engine implements it (`runtime/engine/attention.py`),
so the dependency points one way: the engine imports the models, the models never import the engine.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch


class AttentionBackend(ABC):
    """Also carries `ops`, the kernel set of the same family (norms, RoPE, activation, sampling), so a
    model built on a backend runs every op of a step on that backend."""

    name: str
    ops: Any  # lmforge.kernels.backend.Ops

    @abstractmethod
    def build_metadata(self, common: Any) -> Any:
        """Called once per step, before the model (common: the engine's `CommonAttentionMetadata`); the
        result is handed to every layer."""

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: Any,
        scale: float,
        *,
        k_scale_cache: torch.Tensor | None = None,
        v_scale_cache: torch.Tensor | None = None,
        sliding_window: int | None = None,
        alibi_slopes: torch.Tensor | None = None,
        logits_soft_cap: float | None = None,
    ) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] (new tokens) -> [T, H, D]; writes k/v into the cache first.
        With scale caches given (int8 KV cache), k/v are quantized on write and dequantized on read.
        sliding_window / alibi_slopes / logits_soft_cap: this layer's score options (engine attention.py)."""
