"""Multi-head latent attention (DeepSeek-V2/V3, MiniCPM3) over a paged cache of latents.

What a token leaves in the cache is one vector of kv_lora_rank + rope_head_dim numbers, shared by every
head: the normalised KV latent c (kv_a_layernorm(kv_a_proj(x))[:L]) and the rotated shared key k_pe.
That is the point of MLA: DeepSeek-V2's 128 heads x (192 + 128) numbers per token shrink to 512 + 64.
The cache of a layer is `kv_cache` [num_blocks, block_size, L + R]; `kv_bytes_per_token` tells the
engine's block sizing what a token really costs.

Attention runs in the absorbed form (DeepSeek-V2 paper, appendix C): kv_b_proj's rows are the per-head
up-projections W_UK [H, nope, L] (keys) and W_UV [H, v, L] (values); instead of expanding every cached
latent into H keys and values, the query is pulled down into the latent space once,
    q_lat = q_nope @ W_UK            [T, H, L]        scores = [q_lat | q_pe] . [c | k_pe] * scale
    ctx   = softmax(scores) @ c      [T, H, L]        out    = ctx @ W_UV^T   [T, H, v] -> o_proj
which is the same number as HF's expanded q_nope . (W_UK c) + q_pe . k_pe, at L + R (not H x (nope + v))
reads per cached token. The softmax scale is qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2
under yarn (transformers' `yarn_apply_mscale`).

The step layout comes from the attention backend's metadata, sequence by sequence from the block tables
(torch or Triton backend; with Triton the model's other ops run as Triton kernels, the fused MoE
included). MLA models decode without CUDA graphs.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.runtime.models.attention_backend import AttentionBackend
from lmforge.runtime.models.config import MLAConfig, ModelConfig
from lmforge.runtime.models.layers import RMSNorm, RotaryEmbedding

LATENT_NORM_EPS = 1e-6  # transformers builds kv_a_layernorm / q_a_layernorm without the config's eps


def mla_softmax_scale(mla: MLAConfig, rope_scaling: dict[str, Any] | None) -> float:
    """qk_head_dim^-0.5, times mscale^2 for yarn configs with mscale_all_dim (transformers' yarn_apply_mscale)."""
    scale = (mla.nope_head_dim + mla.rope_head_dim) ** -0.5
    scaling = rope_scaling or {}
    mscale_all_dim = scaling.get("mscale_all_dim")
    if scaling.get("rope_type", "default") != "default" and mscale_all_dim:
        factor = float(scaling["factor"])
        mscale = 1.0 if factor <= 1 else 0.1 * mscale_all_dim * math.log(factor) + 1.0
        scale *= mscale * mscale
    return scale


class LatentAttention(nn.Module):
    """Holds one layer's latent cache (bound by the model runner through `bind_kv_cache`) and attends to it:
    q [T, H, L + R] (absorbed queries), latent [T, L + R] (new tokens) -> ctx [T, H, L]."""

    sliding_window = None  # the block manager asks every attention layer

    def __init__(self, kv_lora_rank: int, rope_head_dim: int, scale: float):
        super().__init__()
        self.kv_lora_rank, self.latent_dim, self.scale = kv_lora_rank, kv_lora_rank + rope_head_dim, scale
        self.kv_cache = torch.empty(0)  # [num_blocks, block_size, L + R] once bound

    def bind_kv_cache(
        self, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.kv_cache = torch.zeros(num_blocks, block_size, self.latent_dim, dtype=dtype, device=device)

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        return self.latent_dim * dtype.itemsize

    def forward(self, q: torch.Tensor, latent: torch.Tensor, meta: Any) -> torch.Tensor:
        flat = self.kv_cache.view(-1, self.latent_dim)
        flat.index_copy_(0, meta.slot_mapping, latent.to(flat.dtype))
        out = q.new_empty(*q.shape[:2], self.kv_lora_rank)
        # every sequence on its own, from the block tables (both backends' metadata)
        for start, qlen, seq_len, slots in _kernel_layout(meta, self.kv_cache.shape[1]):
            self._attend_one(q, latent, flat, out, start, qlen, seq_len, slots)
        return out

    def _attend_one(self, q: torch.Tensor, latent: torch.Tensor, flat: torch.Tensor, out: torch.Tensor,
                    start: int, qlen: int, seq_len: int, slots: torch.Tensor | None) -> None:  # fmt: skip
        """One sequence's qlen new tokens (rows start..) against its seq_len cached latents (slots; None:
        a fresh prompt, whose latents are the new ones)."""
        keys = latent[start : start + qlen] if slots is None else flat[slots]  # [S, L + R]
        q_pos = torch.arange(seq_len - qlen, seq_len, device=q.device)
        visible = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]  # [qlen, S]
        qp = q[start : start + qlen].transpose(0, 1)[None]  # [1, H, qlen, L + R]
        out[start : start + qlen] = self._attend(qp, keys[None], visible[None, None])[0].transpose(0, 1)

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """q [B, H, Lq, L + R], keys [B, S, L + R] (values: their first L dims) -> [B, H, Lq, L]."""
        k = keys.unsqueeze(1).to(q.dtype)  # one latent "head" shared by all heads
        v = k[..., : self.kv_lora_rank]
        return F.scaled_dot_product_attention(q, k.expand(-1, q.shape[1], -1, -1), v.expand(-1, q.shape[1], -1, -1),
                                              attn_mask=visible, scale=self.scale)  # fmt: skip


def _dense_weight(linear: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """kv_b_proj's matrix [out, in], also from a quantized checkpoint (the absorbed form multiplies by
    its per-head blocks rather than calling the layer): W4A16/W8A16 codes or fp8, dequantized."""
    q: Any = linear  # QuantLinear / Fp8Linear / nn.Linear: told apart by their parameters
    if hasattr(q, "weight_packed"):
        from lmforge.kernels.quant_pack import dequantize_weight

        shape = (q.out_features, q.in_features)
        return dequantize_weight(q.weight_packed, q.weight_scale, q.bits, shape).to(dtype)
    weight: torch.Tensor = q.weight
    if hasattr(q, "weight_scale"):  # Fp8Linear
        weight = weight.to(q.weight_scale.dtype) * q.weight_scale
    return weight.to(dtype)


def _kernel_layout(meta: Any, block_size: int) -> list[tuple[int, int, int, torch.Tensor]]:
    """(first row, new tokens, context length, cache slots of the context) per sequence, from the Triton
    or torch backend's metadata (cu_seqlens_q or query_lens, seq_lens, block_tables). Host-side: MLA models
    run decode eagerly."""
    if hasattr(meta, "cu_seqlens_q"):
        cu = meta.cu_seqlens_q.tolist()
    else:  # TorchAttentionMetadata
        cu = [0, *itertools.accumulate(meta.query_lens)]
    lens = meta.seq_lens.tolist()
    layout = []
    for b, seq_len in enumerate(lens):
        pos = torch.arange(seq_len, device=meta.block_tables.device)
        slots = meta.block_tables[b, pos // block_size].long() * block_size + pos % block_size
        layout.append((cu[b], cu[b + 1] - cu[b], seq_len, slots))
    return layout


class MLAAttention(nn.Module):
    """DeepSeek-V2's attention module, weight names as in the checkpoint (q_proj or q_a_proj + q_a_layernorm +
    q_b_proj; kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj)."""

    def __init__(self, cfg: ModelConfig, rotary_emb: RotaryEmbedding, backend: AttentionBackend):
        super().__init__()
        mla = cfg.mla
        assert mla is not None
        self.mla, self.num_heads = mla, cfg.num_heads
        qk_head_dim = mla.nope_head_dim + mla.rope_head_dim
        hidden, heads, bias = cfg.hidden_size, cfg.num_heads, mla.attention_bias
        if mla.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, heads * qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, mla.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, LATENT_NORM_EPS, backend.ops)
            self.q_b_proj = nn.Linear(mla.q_lora_rank, heads * qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, mla.latent_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, LATENT_NORM_EPS, backend.ops)
        self.kv_b_proj = nn.Linear(mla.kv_lora_rank, heads * (mla.nope_head_dim + mla.v_head_dim), bias=False)
        self.o_proj = nn.Linear(heads * mla.v_head_dim, hidden, bias=bias)
        self.rotary_emb = rotary_emb
        self.attn = LatentAttention(
            mla.kv_lora_rank, mla.rope_head_dim, mla_softmax_scale(mla, cfg.rope_scaling)
        )

    def forward(self, positions: torch.Tensor, x: torch.Tensor, attn_meta: Any) -> torch.Tensor:
        mla, num_tokens = self.mla, x.shape[0]
        if mla.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(num_tokens, self.num_heads, -1)
        q_nope, q_pe = q.split([mla.nope_head_dim, mla.rope_head_dim], dim=-1)
        c, k_pe = self.kv_a_proj_with_mqa(x).split([mla.kv_lora_rank, mla.rope_head_dim], dim=-1)
        c = self.kv_a_layernorm(c.contiguous())
        q_pe, k_pe = q_pe.contiguous(), k_pe.contiguous().unsqueeze(1)  # [T, H, R], [T, 1, R]
        self.rotary_emb(positions, q_pe, k_pe, attn_meta.prompt_lens)  # in place
        w = _dense_weight(self.kv_b_proj, x.dtype).view(
            self.num_heads, mla.nope_head_dim + mla.v_head_dim, -1
        )
        w_uk, w_uv = w[:, : mla.nope_head_dim], w[:, mla.nope_head_dim :]  # [H, nope, L], [H, v, L]
        q_lat = torch.einsum("thn,hnl->thl", q_nope, w_uk)
        ctx = self.attn(torch.cat([q_lat, q_pe], dim=-1), torch.cat([c, k_pe[:, 0]], dim=-1), attn_meta)
        out = torch.einsum("thl,hvl->thv", ctx, w_uv)  # [T, H, v]
        return self.o_proj(out.reshape(num_tokens, self.num_heads * mla.v_head_dim))
