"""Building blocks of the Llama family: norms, RoPE, fused linears with weight loaders, paged attention.

Norms, RoPE and the MLP activation call the kernel backend (`lmforge.kernels.backend.Ops`: the torch
references on CPU, the fused Triton kernels on CUDA), chosen once by the model runner.

Fused parameters carry a `weight_loader(param, loaded, shard_id)` so the checkpoint loader can
write HF's separate q/k/v (gate/up) tensors into one matrix; T = tokens in the flattened batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmforge.kernels.backend import Ops
from lmforge.kernels.rope_cache import build_rope_cache
from lmforge.runtime.engine.attention import AttentionBackend


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint {tuple(loaded.shape)}")
    param.data.copy_(loaded)


class RMSNorm(nn.Module):
    """RMSNorm through the kernel backend; given the residual stream it fuses the add (vLLM style):
    `norm(x, residual)` returns (rms_norm(x + residual), x + residual), one pass over both."""

    def __init__(self, dim: int, eps: float, ops: Ops):
        super().__init__()
        self.eps, self.ops = eps, ops
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> Any:
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)  # [T, dim]
        return self.ops.fused_add_rms_norm(x, residual, self.weight, self.eps)  # ([T, dim], [T, dim])


class RotaryEmbedding(nn.Module):
    """Neox-style RoPE (rotate_half, as HF stores Llama weights) applied to q and k in place.

    The cos/sin table comes from `lmforge.kernels.rope_cache` (bit-identical inverse frequencies to
    transformers, Llama 3.1 scaling included) and is read by the backend's `rope` kernel per token.
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None, ops: Ops):
        super().__init__()
        self.ops = ops
        self.register_buffer("cos_sin_cache", build_rope_cache(head_dim, max_positions, theta, scaling),
                             persistent=False)  # [P, head_dim] fp32: cos half | sin half

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> None:
        """positions [T]; q [T, H, D], k [T, Hkv, D] (views into the fused qkv output), rotated in place."""
        self.ops.rope(positions, q, k, self.cos_sin_cache)


class QKVLinear(nn.Linear):
    """q, k and v projections in one matmul: out = [q (H*D) | k (Hkv*D) | v (Hkv*D)]."""

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool):
        self.sizes = {"q": num_heads * head_dim, "k": num_kv_heads * head_dim, "v": num_kv_heads * head_dim}
        super().__init__(hidden, sum(self.sizes.values()), bias=bias)
        for p in self.parameters():
            p.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str) -> None:
        offset = {"q": 0, "k": self.sizes["q"], "v": self.sizes["q"] + self.sizes["k"]}[shard_id]
        default_weight_loader(param.data.narrow(0, offset, self.sizes[shard_id]), loaded)


class MergedLinear(nn.Linear):
    """Several projections of the same input stacked on the output dim (gate_up = [gate | up])."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False):
        self.out_sizes = out_sizes
        super().__init__(in_features, sum(out_sizes), bias=bias)
        for p in self.parameters():
            p.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int) -> None:
        offset = sum(self.out_sizes[:shard_id])
        default_weight_loader(param.data.narrow(0, offset, self.out_sizes[shard_id]), loaded)


class PagedAttention(nn.Module):
    """Holds one layer's slice of the KV cache (bound by the model runner) and calls the backend.

    The layer's own attention math travels with it (each defaults to plain causal Llama attention):
        scale            softmax scale; None: head_dim ** -0.5 (Gemma2: query_pre_attn_scalar ** -0.5)
        sliding_window   query i sees keys i - window < j <= i (Mistral, Gemma2/3 local layers, Qwen2 upper layers)
        alibi_slopes     [num_heads] per-head slopes, bias slope * (j - i) (BLOOM, MPT, Falcon-alibi);
                         see `lmforge.kernels.alibi.alibi_slopes`
        logits_soft_cap  scores -> cap * tanh(scores / cap) before masking (Gemma2 attn_logit_softcapping)
    The block manager reads `sliding_window` of every layer to free blocks no layer can see any more.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, backend: AttentionBackend, *,
                 scale: float | None = None, sliding_window: int | None = None,
                 alibi_slopes: torch.Tensor | None = None, logits_soft_cap: float | None = None):
        super().__init__()
        if scale is not None and not scale > 0:
            raise ValueError(f"PagedAttention: scale must be positive, got {scale}")
        if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(sliding_window, int)
                                           or sliding_window < 1):
            raise ValueError(f"PagedAttention: sliding_window must be a positive int or None, got {sliding_window!r}")
        if logits_soft_cap is not None and not logits_soft_cap > 0:
            raise ValueError(f"PagedAttention: logits_soft_cap must be positive or None, got {logits_soft_cap}")
        if alibi_slopes is not None and tuple(alibi_slopes.shape) != (num_heads,):
            raise ValueError(f"PagedAttention: alibi_slopes must have shape ({num_heads},), "
                             f"got {tuple(alibi_slopes.shape)}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = float(scale) if scale is not None else head_dim**-0.5
        self.sliding_window = sliding_window
        self.logits_soft_cap = float(logits_soft_cap) if logits_soft_cap is not None else None
        slopes = None if alibi_slopes is None else alibi_slopes.detach().to(torch.float32).contiguous()
        self.register_buffer("alibi_slopes", slopes, persistent=False)  # follows the model's device; fp32 always
        self.backend = backend
        self.k_cache = self.v_cache = torch.empty(0)  # [num_blocks, block_size, Hkv, D] once bound
        # int8 KV cache only: per-(token, head) fp32 scales [num_blocks, block_size, Hkv]; None otherwise
        self.k_scale_cache: torch.Tensor | None = None
        self.v_scale_cache: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_meta: Any) -> torch.Tensor:
        # q [T, H, D]; k, v [T, Hkv, D] -> [T, H, D]
        return self.backend.forward(q, k, v, self.k_cache, self.v_cache, attn_meta, self.scale,
                                    k_scale_cache=self.k_scale_cache, v_scale_cache=self.v_scale_cache,
                                    sliding_window=self.sliding_window, alibi_slopes=self.alibi_slopes,
                                    logits_soft_cap=self.logits_soft_cap)
