"""Torch references of the mixture-of-experts ops: the spec `fused_moe.py` is tested against, and the
CPU backend of the engine's MoE layers. A plain loop over experts, as transformers computes it.

Shapes (T tokens, H hidden, E experts, I expert intermediate size, k experts per token):
    w13 [E, 2I, H]   each expert's gate (rows :I) and up (rows I:) projections, stacked
    w2  [E, H, I]    each expert's down projection
    topk_ids [T, k] int, topk_weights [T, k] fp32 (the router's choice; see runtime/models/moe.py)
Quantized experts (W4A16 / W8A16) hand the same function their dequantized [E, ...] weights.
"""

from __future__ import annotations

import torch

from .quant_pack import dequantize_weight
from .reference import act_and_mul


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """x [T, H] -> [T, H]: sum over the k chosen experts e of weight * down_e(act(gate_e(x)) * up_e(x)).

    Like transformers' experts loop: each expert's output is scaled by its routing weight (fp32 times
    the activation dtype), rounded to x.dtype and added to the token's row; experts no token chose are
    skipped. `activation`: a key of reference.act_and_mul ("silu", "gelu", "gelu_tanh", "relu")."""
    out = torch.zeros_like(x)
    for expert in range(w13.shape[0]):
        token, slot = torch.where(topk_ids == expert)
        if token.numel() == 0:
            continue
        hidden = act_and_mul(x[token] @ w13[expert].t(), activation)
        y = (hidden @ w2[expert].t()) * topk_weights[token, slot, None]
        out.index_add_(0, token, y.to(x.dtype))
    return out


def fused_moe_quant(
    x: torch.Tensor,
    w13_packed: torch.Tensor,
    w13_scale: torch.Tensor,
    w2_packed: torch.Tensor,
    w2_scale: torch.Tensor,
    bits: int,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """`fused_moe` on pack-quantized experts (codes [E, N, K*bits/32] int32, scales [E, N, K/group]): each
    weight q * scale in the scale dtype (`quant_pack.dequantize_weight`), then cast to x.dtype."""
    return fused_moe(x, dequantize_experts(w13_packed, w13_scale, bits).to(x.dtype),
                     dequantize_experts(w2_packed, w2_scale, bits).to(x.dtype), topk_weights, topk_ids, activation)  # fmt: skip


def dequantize_experts(packed: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """[E, N, K*bits/32] codes + [E, N, K/group] scales -> [E, N, K] in the scale dtype."""
    e, n = packed.shape[:2]
    k = packed.shape[2] * 32 // bits
    flat = dequantize_weight(packed.reshape(e * n, -1), scale.reshape(e * n, -1), bits, (e * n, k))
    return flat.view(e, n, k)
