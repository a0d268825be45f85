"""The Llama family (Llama 2/3/3.1/3.2, Mistral, Qwen2) over a paged KV cache.

Inputs are flattened across the batch: T tokens from any mix of prefill chunks and decodes, with
`positions` [T] and the backend's attention metadata describing who is who. The residual stream
is carried next to the hidden states so each norm fuses the residual add (one kernel per norm).
Every elementwise op goes through `backend.ops` (torch references or Triton kernels).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmforge.runtime.engine.attention import AttentionBackend
from lmforge.runtime.models.config import ModelConfig
from lmforge.runtime.models.layers import MergedLinear, PagedAttention, QKVLinear, RMSNorm, RotaryEmbedding


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary_emb: RotaryEmbedding, backend: AttentionBackend):
        super().__init__()
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.head_dim = cfg.head_dim
        self.rotary_emb = rotary_emb  # one module shared by every layer (its table is a non-persistent buffer)
        self.qkv_proj = QKVLinear(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.attn = PagedAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, backend,
                                   sliding_window=cfg.sliding_window)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, attn_meta: Any) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, -1, self.head_dim)  # [T, H, D]
        k = k.view(num_tokens, -1, self.head_dim)  # [T, Hkv, D]
        v = v.view(num_tokens, -1, self.head_dim)
        self.rotary_emb(positions, q, k)  # in place
        out = self.attn(q, k, v, attn_meta)  # [T, H, D]
        return self.o_proj(out.reshape(num_tokens, self.q_size))  # [T, hidden]


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend):
        super().__init__()
        self.ops = backend.ops
        self.gate_up_proj = MergedLinear(cfg.hidden_size, [cfg.intermediate_size] * 2)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary_emb: RotaryEmbedding, backend: AttentionBackend):
        super().__init__()
        self.self_attn = LlamaAttention(cfg, rotary_emb, backend)
        self.mlp = LlamaMLP(cfg, backend)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, backend.ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, backend.ops)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                attn_meta: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) -> (mlp output, residual stream before it); HF's x + attn(norm(x)) ... unrolled."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, attn_meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int, backend: AttentionBackend):
        super().__init__()
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling,
                                          backend.ops)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, self.rotary_emb, backend) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, backend.ops)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_meta: Any) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, hidden]
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, attn_meta)
        return self.norm(x) if residual is None else self.norm(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    """Also serves MistralForCausalLM and Qwen2ForCausalLM: same graph, flags from ModelConfig."""

    # HF checkpoint name -> (our fused parameter, shard id)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig, max_positions: int, backend: AttentionBackend):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, max_positions, backend)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_meta: Any) -> torch.Tensor:
        return self.model(input_ids, positions, attn_meta)  # [T, hidden]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, vocab]
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return hidden @ weight.t()

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]
