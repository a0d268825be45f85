"""Falcon (FalconForCausalLM) over a paged KV cache, every variant transformers implements:

    7B     multi_query (one K/V head), parallel_attn: x + attn(ln(x)) + mlp(ln(x)), one norm
    40B    new_decoder_architecture: grouped K/V heads (num_kv_heads), ln_attn / ln_mlp (11B: one norm)
    RW     parallel_attn=False (sequential blocks), all heads K/V, biases, alibi=True instead of RoPE

The fused `query_key_value` stays one Linear (also when quantized); its output is split per layout:
new_decoder_architecture [Hkv, H/Hkv + 2, D] (per group: its query heads, then k, then v), multi_query
[H + 2, D], else [H, 3, D] interleaved.

ALiBi: transformers (after the original RW code) rounds each bias slope * position to bfloat16 before
dividing it by sqrt(head_dim). The paged kernels add slope * position exactly, which equals HF's bias
only while every product is a bfloat16 number; `alibi_exact_positions` finds that length and the model
refuses a longer context instead of serving a different model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from lmforge.kernels.alibi import alibi_slopes
from lmforge.runtime.models.attention_backend import AttentionBackend
from lmforge.runtime.models.config import ModelConfig
from lmforge.runtime.models.family_config import (
    FamilyConfigError,
    activation_fn,
    base_config,
    require,
    rope_from_hf,
)
from lmforge.runtime.models.layers import PagedAttention, RotaryEmbedding

ARCHITECTURE = "FalconForCausalLM"


@dataclass(frozen=True, slots=True)
class FalconOptions:
    qkv_layout: str  # "grouped" (new_decoder_architecture) | "multi_query" | "interleaved"
    parallel_attn: bool
    num_ln: int  # norms per parallel block: 2 (ln_attn, ln_mlp) or 1 (input_layernorm)
    alibi: bool
    bias: bool
    activation: str
    layer_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    arch = ARCHITECTURE
    hidden = require(arch, hf, "hidden_size")
    heads = require(arch, hf, "num_attention_heads")
    new_arch = bool(hf.get("new_decoder_architecture", False))
    multi_query = bool(hf.get("multi_query", True))
    parallel = bool(hf.get("parallel_attn", True))
    num_kv = hf.get("num_kv_heads") or heads
    num_ln = hf.get("num_ln_in_parallel_attn") or (2 if new_arch else 1)
    if new_arch:
        layout = "grouped"
        if not parallel:  # HF builds input/post_attention_layernorm, then calls ln_attn: no such model
            raise FamilyConfigError(
                f"{arch}: new_decoder_architecture=True with parallel_attn=False is not supported"
            )
        if heads % num_kv:
            raise FamilyConfigError(
                f"{arch}: num_kv_heads={num_kv} does not divide num_attention_heads={heads}"
            )
    elif multi_query:
        layout, num_kv = "multi_query", 1
    else:
        layout = "interleaved"
        if num_kv != heads:
            raise FamilyConfigError(
                f"{arch}: num_kv_heads={num_kv} without new_decoder_architecture or "
                f"multi_query is not supported (HF's fused layout holds {heads} K/V heads)"
            )
    if parallel and not new_arch and num_ln != 1:
        raise FamilyConfigError(
            f"{arch}: num_ln_in_parallel_attn={num_ln} needs new_decoder_architecture=True"
        )
    if num_ln not in (1, 2):
        raise FamilyConfigError(f"{arch}: num_ln_in_parallel_attn={num_ln} is not supported (1 or 2)")
    activation = hf.get("activation", "gelu")
    activation_fn(arch, "activation", activation)
    theta, scaling = rope_from_hf(hf)
    options = FalconOptions(
        qkv_layout=layout,
        parallel_attn=parallel,
        num_ln=num_ln,
        alibi=bool(hf.get("alibi", False)),
        bias=bool(hf.get("bias", False)),
        activation=activation,
        layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        rope_theta=theta,
        rope_scaling=scaling,
    )
    return base_config(
        hf,
        architecture=arch,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=num_kv,
        num_layers=require(arch, hf, "num_hidden_layers"),
        intermediate_size=hf.get("ffn_hidden_size") or 4 * hidden,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        family=options,
    )


def alibi_exact_positions(slopes: torch.Tensor, max_positions: int) -> int:
    """Positions p < result have HF's bfloat16 bias bf16(bf16(slope) * p) equal to the exact product for
    every head (HF's build_alibi_tensor multiplies a bf16 slope tensor by integer positions)."""
    positions = torch.arange(max_positions)
    hf_bias = slopes.bfloat16()[:, None] * positions[None, :]  # [H, P], HF's op
    exact = slopes.bfloat16().double()[:, None] * positions.double()[None, :]
    wrong = (hf_bias.double() != exact).any(0).nonzero()
    return int(wrong[0]) if len(wrong) else max_positions


def falcon_alibi_slopes(num_heads: int, head_dim: int, max_positions: int) -> torch.Tensor:
    """Per-head slopes of the bias the kernels add: bf16(BLOOM slope) / sqrt(head_dim), fp32 [H]."""
    slopes = alibi_slopes(num_heads)
    exact = alibi_exact_positions(slopes, max_positions)
    if exact < max_positions:
        raise FamilyConfigError(
            f"{ARCHITECTURE}: alibi=True with {num_heads} heads: transformers rounds the ALiBi bias "
            f"slope*position to bfloat16, which the engine reproduces only for positions < {exact}; "
            f"max_model_len={max_positions} would serve a different model (pass max_model_len <= {exact})"
        )
    return slopes.bfloat16().float() / head_dim**0.5


class FalconAttention(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        rotary_emb: RotaryEmbedding | None,
        alibi: torch.Tensor | None,
        backend: AttentionBackend,
    ):
        super().__init__()
        opts: FalconOptions = cfg.family
        self.layout, self.head_dim = opts.qkv_layout, cfg.head_dim
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        out = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        self.query_key_value = nn.Linear(cfg.hidden_size, out, bias=opts.bias)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=opts.bias)
        self.rotary_emb = rotary_emb  # shared by every layer; None with ALiBi
        self.attn = PagedAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, backend, alibi_slopes=alibi)

    def split_qkv(self, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[T, (H + 2 Hkv) D] -> q [T, H, D], k / v [T, Hkv, D] (contiguous: rope works in place)."""
        num_tokens, d = fused.shape[0], self.head_dim
        if self.layout == "grouped":
            grouped = fused.view(num_tokens, self.num_kv_heads, -1, d)  # [T, Hkv, H/Hkv + 2, D]
            q = grouped[:, :, :-2].reshape(num_tokens, self.num_heads, d)
            k, v = grouped[:, :, -2], grouped[:, :, -1]
        elif self.layout == "multi_query":
            q, k, v = fused.view(num_tokens, -1, d).split([self.num_heads, 1, 1], dim=1)
        else:
            q, k, v = fused.view(num_tokens, self.num_heads, 3, d).unbind(2)
        return q.contiguous(), k.contiguous(), v.contiguous()

    def forward(self, positions: torch.Tensor, x: torch.Tensor, attn_meta: Any) -> torch.Tensor:
        q, k, v = self.split_qkv(self.query_key_value(x))
        if self.rotary_emb is not None:
            self.rotary_emb(positions, q, k, attn_meta.prompt_lens)  # longrope / dynamic read prompt_lens
        out = self.attn(q, k, v, attn_meta)  # [T, H, D]
        return self.dense(out.reshape(x.shape[0], -1))


class FalconMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        bias = cfg.family.bias
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=bias)
        self.dense_4h_to_h = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=bias)
        self.act = activation_fn(ARCHITECTURE, "activation", cfg.family.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class FalconDecoderLayer(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        rotary_emb: RotaryEmbedding | None,
        alibi: torch.Tensor | None,
        backend: AttentionBackend,
    ):
        super().__init__()
        opts: FalconOptions = cfg.family
        self.parallel, self.two_norms = opts.parallel_attn, opts.parallel_attn and opts.num_ln == 2
        self.self_attention = FalconAttention(cfg, rotary_emb, alibi, backend)
        self.mlp = FalconMLP(cfg)

        def norm() -> nn.LayerNorm:
            return nn.LayerNorm(cfg.hidden_size, eps=opts.layer_norm_eps)

        if self.two_norms:
            self.ln_attn, self.ln_mlp = norm(), norm()
        else:
            self.input_layernorm = norm()
            if not self.parallel:
                self.post_attention_layernorm = norm()

    def forward(self, positions: torch.Tensor, x: torch.Tensor, attn_meta: Any) -> torch.Tensor:
        if self.two_norms:
            attn_in, mlp_in = self.ln_attn(x), self.ln_mlp(x)
        else:
            attn_in = mlp_in = self.input_layernorm(x)
        attn_out = self.self_attention(positions, attn_in, attn_meta)
        if self.parallel:
            return x + attn_out + self.mlp(mlp_in)
        x = x + attn_out
        return x + self.mlp(self.post_attention_layernorm(x))


class FalconModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int, backend: AttentionBackend):
        super().__init__()
        opts: FalconOptions = cfg.family
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        alibi = falcon_alibi_slopes(cfg.num_heads, cfg.head_dim, max_positions) if opts.alibi else None
        self.rotary_emb = (
            None
            if opts.alibi
            else RotaryEmbedding(
                cfg.head_dim,
                max_positions,
                opts.rope_theta,
                opts.rope_scaling,
                backend.ops,
                max_position_embeddings=cfg.max_position_embeddings,
            )
        )
        self.h = nn.ModuleList(
            FalconDecoderLayer(cfg, self.rotary_emb, alibi, backend) for _ in range(cfg.num_layers)
        )
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=opts.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_meta: Any) -> torch.Tensor:
        x = self.word_embeddings(input_ids)
        for layer in self.h:
            x = layer(positions, x, attn_meta)
        return self.ln_f(x)


class FalconForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int, backend: AttentionBackend):
        super().__init__()
        self.config = cfg
        self.transformer = FalconModel(cfg, max_positions, backend)
        self.lm_head = (
            None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_meta: Any) -> torch.Tensor:
        return self.transformer(input_ids, positions, attn_meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.transformer.word_embeddings.weight if self.lm_head is None else self.lm_head.weight
        return hidden @ weight.t()

    def attention_layers(self) -> list[PagedAttention]:
        return [cast(FalconDecoderLayer, layer).self_attention.attn for layer in self.transformer.h]
