"""BLOOM (BloomForCausalLM) over a paged KV cache: ALiBi instead of positions, a LayerNorm right after the
embedding, pre-LayerNorm blocks with biases, tanh-GELU MLP, tied head.

`query_key_value` is one Linear whose output is [H, 3, D] interleaved per head (HF's layout, kept as is,
also when quantized). `apply_residual_connection_post_layernorm` makes each residual branch start from
the normed input instead of the block input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from lmforge.kernels.alibi import alibi_slopes
from lmforge.runtime.models.attention_backend import AttentionBackend
from lmforge.runtime.models.config import ModelConfig
from lmforge.runtime.models.family_config import activation_fn, base_config, require
from lmforge.runtime.models.layers import PagedAttention

ARCHITECTURE = "BloomForCausalLM"
DEFAULT_MAX_POSITIONS = (
    2048  # ALiBi has no table; BLOOM's training length unless config.json says `seq_length`
)


@dataclass(frozen=True, slots=True)
class BloomOptions:
    layer_norm_eps: float
    residual_post_layernorm: bool  # HF `apply_residual_connection_post_layernorm`


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    hidden = require(ARCHITECTURE, hf, "hidden_size")
    heads = hf.get("n_head") or require(ARCHITECTURE, hf, "num_attention_heads")
    # pretraining_tp / slow_but_exact only split dense's matmul into slices (same sums): accepted.
    options = BloomOptions(
        layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        residual_post_layernorm=bool(hf.get("apply_residual_connection_post_layernorm", False)),
    )
    return base_config(
        hf,
        architecture=ARCHITECTURE,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=heads,
        num_layers=hf.get("n_layer") or require(ARCHITECTURE, hf, "num_hidden_layers"),
        intermediate_size=4 * hidden,
        max_position_embeddings=hf.get("seq_length") or DEFAULT_MAX_POSITIONS,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        family=options,
    )


class BloomAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)
        self.attn = PagedAttention(
            cfg.num_heads, cfg.num_heads, cfg.head_dim, backend, alibi_slopes=alibi_slopes(cfg.num_heads)
        )

    def forward(self, x: torch.Tensor, attn_meta: Any) -> torch.Tensor:
        num_tokens = x.shape[0]
        fused = self.query_key_value(x).view(num_tokens, self.num_heads, 3, self.head_dim)
        q, k, v = (t.contiguous() for t in fused.unbind(2))  # [T, H, D] each
        return self.dense(self.attn(q, k, v, attn_meta).reshape(num_tokens, -1))


class BloomMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.dense_4h_to_h = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)
        # HF's BloomGelu is the tanh approximation (Megatron's 0.79788456 for sqrt(2/pi): 1e-9 apart)
        self.act = activation_fn(ARCHITECTURE, "BloomGelu", "gelu_pytorch_tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class BloomBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend):
        super().__init__()
        eps = cfg.family.layer_norm_eps
        self.residual_post_ln = cfg.family.residual_post_layernorm
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=eps)
        self.self_attention = BloomAttention(cfg, backend)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=eps)
        self.mlp = BloomMLP(cfg)

    def forward(self, x: torch.Tensor, attn_meta: Any) -> torch.Tensor:
        normed = self.input_layernorm(x)
        x = (normed if self.residual_post_ln else x) + self.self_attention(normed, attn_meta)
        normed = self.post_attention_layernorm(x)
        return (normed if self.residual_post_ln else x) + self.mlp(normed)


class BloomModel(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend):
        super().__init__()
        eps = cfg.family.layer_norm_eps
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.word_embeddings_layernorm = nn.LayerNorm(cfg.hidden_size, eps=eps)
        self.h = nn.ModuleList(BloomBlock(cfg, backend) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_meta: Any) -> torch.Tensor:
        x = self.word_embeddings_layernorm(self.word_embeddings(input_ids))  # positions: ALiBi, in attention
        for block in self.h:
            x = block(x, attn_meta)
        return self.ln_f(x)


class BloomForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int, backend: AttentionBackend):
        super().__init__()
        self.config = cfg
        self.transformer = BloomModel(cfg, backend)
        self.lm_head = (
            None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_meta: Any) -> torch.Tensor:
        return self.transformer(input_ids, positions, attn_meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.transformer.word_embeddings.weight if self.lm_head is None else self.lm_head.weight
        return hidden @ weight.t()

    def attention_layers(self) -> list[PagedAttention]:
        return [cast(BloomBlock, block).self_attention.attn for block in self.transformer.h]
