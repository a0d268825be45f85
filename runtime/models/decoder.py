"""One decoder graph for the dense families (Llama, Mistral, Qwen2/3, Gemma/2/3, Phi/Phi-3, GPT-NeoX,
StableLM, OLMo/2, StarCoder2, GLM/GLM-4, Cohere) over a paged KV cache; the switches come from
`ModelConfig` (filled per family by families.py), never from the architecture name.

Inputs are flattened across the batch: T tokens from any mix of prefill chunks and decodes, with
`positions` [T] and the backend's attention metadata describing who is who. The residual stream is
carried next to the hidden states so that each pre-norm fuses the residual add (one kernel per norm
on the Llama path): a layer returns (its output delta, the residual stream before it).
"""

from __future__ import annotations

import re
from typing import Any, cast

import torch
from torch import nn

from lmforge.runtime.models.attention_backend import AttentionBackend
from lmforge.runtime.models.config import ModelConfig
from lmforge.runtime.models.families import FAMILIES, hf_to_ours, ours_to_hf
from lmforge.runtime.models.layers import (
    LayerNorm,
    MergedLinear,
    PagedAttention,
    QKVLinear,
    RotaryEmbedding,
    act_and_mul,
    make_norm,
)
from lmforge.runtime.models.mla import LatentAttention, MLAAttention
from lmforge.runtime.models.moe import SparseMoeBlock, expert_target


class PerHeadLayerNorm(nn.Module):
    """LayerNorm over head_dim with its own weight per head, no bias: Cohere's q/k norm (weight [H, D])."""

    def __init__(self, num_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H, D]
        xf = x.float()
        mean = xf.mean(-1, keepdim=True)
        var = (xf - mean).pow(2).mean(-1, keepdim=True)
        return (self.weight.float() * ((xf - mean) * torch.rsqrt(var + self.eps))).to(x.dtype)


class HeadNormList(nn.Module):
    """StableLM's q/k norm: one bias-free LayerNorm per head (`norms.<h>.weight` in the checkpoint)."""

    def __init__(self, num_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.norms = nn.ModuleList(LayerNorm(head_dim, eps, bias=False) for _ in range(num_heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H, D]
        return torch.stack([norm(x[:, h]) for h, norm in enumerate(self.norms)], dim=1)


def _qk_norm(cfg: ModelConfig, num_heads: int, ops: Any) -> nn.Module | None:
    """The q (num_heads) or k (num_kv_heads) norm of `cfg.qk_norm`."""
    d = cfg.head_dim
    if cfg.qk_norm is None:
        return None
    if cfg.qk_norm == "head":  # Qwen3 (RMS), Gemma3 ((1 + w) RMS): the family's norm kind over head_dim
        return make_norm(cfg.norm, d, cfg.rms_norm_eps, ops)
    if cfg.qk_norm == "full":  # OLMo2: RMS over the whole projection
        return make_norm("rms", num_heads * d, cfg.rms_norm_eps, ops)
    if cfg.qk_norm == "head_layer":  # Phi: one LayerNorm (weight + bias) shared by the heads
        return LayerNorm(d, cfg.rms_norm_eps)
    if cfg.qk_norm == "head_layer_modules":  # StableLM
        return HeadNormList(num_heads, d, cfg.rms_norm_eps)
    return PerHeadLayerNorm(num_heads, d, cfg.rms_norm_eps)  # Cohere


class Attention(nn.Module):
    def __init__(
        self, cfg: ModelConfig, layer_idx: int, rotary_emb: RotaryEmbedding, backend: AttentionBackend
    ):
        super().__init__()
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.head_dim, self.clip_qkv, self.qk_norm_kind = cfg.head_dim, cfg.clip_qkv, cfg.qk_norm
        self.rotary_emb = (
            rotary_emb  # shared by the layers of one RoPE kind (its table is a non-persistent buffer)
        )
        self.qkv_proj = QKVLinear(
            cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.qkv_bias
        )
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = _qk_norm(cfg, cfg.num_heads, backend.ops)
        self.k_norm = _qk_norm(cfg, cfg.num_kv_heads, backend.ops)
        self.attn = PagedAttention(
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            backend,
            scale=cfg.attn_scale,
            sliding_window=cfg.layer_window(layer_idx),
            logits_soft_cap=cfg.attn_logit_softcap,
        )

    def forward(self, positions: torch.Tensor, x: torch.Tensor, attn_meta: Any) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        if self.clip_qkv is not None:
            qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm_kind == "full":
            assert self.q_norm is not None and self.k_norm is not None  # _qk_norm built both
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(num_tokens, -1, self.head_dim)  # [T, H, D]
        k = k.view(num_tokens, -1, self.head_dim)  # [T, Hkv, D]
        v = v.view(num_tokens, -1, self.head_dim)
        if self.qk_norm_kind not in (None, "full"):
            assert self.q_norm is not None and self.k_norm is not None  # _qk_norm built both
            q, k = self.q_norm(q), self.k_norm(k)
        self.rotary_emb(
            positions, q, k, attn_meta.prompt_lens
        )  # in place (longrope/dynamic read prompt_lens)
        out = self.attn(q, k, v, attn_meta)  # [T, H, D]
        return self.o_proj(out.reshape(num_tokens, self.q_size))  # [T, hidden]


class MLP(nn.Module):
    """Gated: down(act(gate(x)) * up(x)) with gate|up fused; plain: down(act(up(x)))."""

    def __init__(self, cfg: ModelConfig, backend: AttentionBackend, intermediate_size: int | None = None):
        super().__init__()
        self.ops, self.act, self.gated = backend.ops, cfg.hidden_act, cfg.gated_mlp
        inter = intermediate_size or cfg.intermediate_size  # a MoE's shared expert has its own size
        if self.gated:
            self.gate_up_proj = MergedLinear(cfg.hidden_size, [inter] * 2, bias=cfg.mlp_bias)
        else:
            self.up_proj = nn.Linear(cfg.hidden_size, inter, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(inter, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        if self.gated:
            return self.down_proj(act_and_mul(self.gate_up_proj(x), self.act, self.ops))
        from lmforge.kernels.reference import activation

        return self.down_proj(activation(self.up_proj(x), self.act))


class DecoderLayer(nn.Module):
    """Norm placement by `cfg.layout` (see ModelConfig). Our norm names: input_layernorm (before
    attention), post_attention_layernorm (before the MLP), attn_out_norm / mlp_out_norm (on outputs)."""

    def __init__(
        self, cfg: ModelConfig, layer_idx: int, rotary_emb: RotaryEmbedding, backend: AttentionBackend
    ):
        super().__init__()
        self.layout, self.residual_multiplier = cfg.layout, cfg.residual_multiplier
        self.self_attn: Attention | MLAAttention = (
            MLAAttention(cfg, rotary_emb, backend)
            if cfg.mla is not None
            else Attention(cfg, layer_idx, rotary_emb, backend)
        )
        self.mlp: nn.Module = (
            SparseMoeBlock(cfg, backend.ops, lambda size: MLP(cfg, backend, size))
            if cfg.moe is not None and cfg.moe.layers[layer_idx]
            else MLP(cfg, backend)
        )
        norm = lambda: make_norm(cfg.norm, cfg.hidden_size, cfg.rms_norm_eps, backend.ops)  # noqa: E731
        if cfg.layout != "post":
            self.input_layernorm = norm()
        if cfg.layout in ("pre", "parallel_2norm", "sandwich"):
            self.post_attention_layernorm = norm()
        if cfg.layout in ("sandwich", "post"):
            self.attn_out_norm, self.mlp_out_norm = norm(), norm()

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, attn_meta: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) -> (delta, residual stream before it); the stream is x + residual (x alone first)."""
        if self.layout == "post":  # OLMo2: h = x + na(attn(x)); out = h + nm(mlp(h))
            h = x if residual is None else x + residual
            h = h + self.attn_out_norm(self.self_attn(positions, h, attn_meta))
            return self.mlp_out_norm(self.mlp(h)), h
        if residual is None:
            n, residual = self.input_layernorm(x), x
        else:
            n, residual = self.input_layernorm(x, residual)
        if self.layout == "parallel":
            return self.self_attn(positions, n, attn_meta) + self.mlp(n), residual
        if self.layout == "parallel_2norm":
            return self.self_attn(positions, n, attn_meta) + self.mlp(
                self.post_attention_layernorm(residual)
            ), residual
        a = self.self_attn(positions, n, attn_meta)
        if self.layout == "sandwich":
            a = self.attn_out_norm(a)
        if self.residual_multiplier is not None:  # MiniCPM3: scale_depth / sqrt(num_layers) on each sublayer
            a = a * self.residual_multiplier
        n, residual = self.post_attention_layernorm(a, residual)
        m = self.mlp(n)
        if self.residual_multiplier is not None:
            m = m * self.residual_multiplier
        return (self.mlp_out_norm(m) if self.layout == "sandwich" else m), residual


def _rotary(
    cfg: ModelConfig, max_positions: int, theta: float, scaling: dict | None, ops: Any
) -> RotaryEmbedding:
    try:
        return RotaryEmbedding(
            cfg.mla.rope_head_dim
            if cfg.mla is not None
            else cfg.head_dim,  # MLA: only the shared rope part rotates
            max_positions,
            theta,
            scaling,
            ops,
            rotary_dim=cfg.rotary_dim,
            is_neox_style=cfg.rope_is_neox_style,
            max_position_embeddings=cfg.max_position_embeddings,
        )
    except ValueError as e:  # the rope tables validate every rope_scaling key: say whose config it is
        raise ValueError(f"{cfg.architecture}: {e}") from e


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int, backend: AttentionBackend):
        super().__init__()
        self.embedding_multiplier = cfg.embedding_multiplier
        self.rotary_emb = _rotary(cfg, max_positions, cfg.rope_theta, cfg.rope_scaling, backend.ops)
        local = None
        if cfg.local_rope_theta is not None:  # Gemma3: the sliding layers' own RoPE
            local = _rotary(cfg, max_positions, cfg.local_rope_theta, cfg.local_rope_scaling, backend.ops)
            self.local_rotary_emb = local
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(
                cfg, i, local if local is not None and cfg.local_rope_layers[i] else self.rotary_emb, backend
            )
            for i in range(cfg.num_layers)
        )
        self.norm = make_norm(cfg.norm, cfg.hidden_size, cfg.rms_norm_eps, backend.ops)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_meta: Any) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, hidden]
        if (
            self.embedding_multiplier is not None
        ):  # Gemma: sqrt(hidden), rounded to the activation dtype first
            x = x * torch.tensor(self.embedding_multiplier, dtype=x.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, attn_meta)
        return self.norm(x) if residual is None else self.norm(x, residual)[0]


_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")


class DecoderForCausalLM(nn.Module):
    """Every family of families.FAMILIES: the same graph, switches from ModelConfig, checkpoint names
    through the family's renames (`hf_to_ours`) and fused shards (`packed_modules_mapping`)."""

    def __init__(self, cfg: ModelConfig, max_positions: int, backend: AttentionBackend):
        super().__init__()
        self.config = cfg
        self.family = FAMILIES[cfg.architecture]
        self.packed_modules_mapping = dict(self.family.packed)  # HF name -> (our fused parameter, shard id)
        self.model = DecoderModel(cfg, max_positions, backend)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=cfg.lm_head_bias)
        )

    def hf_to_ours(self, name: str) -> str | None:
        """Our module name of a checkpoint tensor; None: a layer the config says no forward runs."""
        if self.config.skipped_layers:
            layer = _LAYER_INDEX.match(name)
            if layer is not None and int(layer.group(1)) in self.config.skipped_layers:
                return None
        return hf_to_ours(self.family, name)

    def expert_target(self, name: str) -> tuple[str, tuple[int | None, int | None]] | None:
        """Our name of a per-expert checkpoint tensor -> (stacked parameter, (expert, gate/up half)); None
        for every other tensor (the loader then renames and packs it as usual)."""
        if self.config.moe is None:
            return None
        target = expert_target(name)
        return None if target is None else (f"{target[0]}.{target[1]}", target[2])

    def ours_to_hf(self, name: str) -> str:
        return ours_to_hf(self.family, name)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_meta: Any) -> torch.Tensor:
        return self.model(input_ids, positions, attn_meta)  # [T, hidden]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, vocab]
        cfg = self.config
        if cfg.logits_divisor is not None:  # MiniCPM3: hidden / (hidden_size / dim_model_base)
            hidden = hidden / cfg.logits_divisor
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = hidden @ weight.t()
        if self.lm_head is not None and self.lm_head.bias is not None:
            logits = logits + self.lm_head.bias
        if cfg.logit_scale is not None:
            logits = logits * cfg.logit_scale
        if cfg.final_logit_softcap is not None:
            logits = torch.tanh(logits / cfg.final_logit_softcap) * cfg.final_logit_softcap
        return logits

    def attention_layers(self) -> list[PagedAttention | LatentAttention]:
        """Each layer's cache holder: a PagedAttention, or (MLA) a LatentAttention with its own
        `bind_kv_cache` / `kv_bytes_per_token` (one latent vector per token)."""
        return [cast(DecoderLayer, layer).self_attn.attn for layer in self.model.layers]
