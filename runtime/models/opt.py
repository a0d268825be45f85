"""OPT (OPTForCausalLM) over a paged KV cache: learned positions with HF's offset of 2, LayerNorm blocks
(pre-LN, or post-LN for OPT-350m's `do_layer_norm_before=False`), biases, a ReLU MLP (fc1 / fc2), tied
head, and the word_embed_proj_dim projections (project_in / project_out) of OPT-350m.

Module names are HF's; HF's separate q/k/v projections load into one fused `qkv_proj`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from lmforge.runtime.models.attention_backend import AttentionBackend
from lmforge.runtime.models.config import ModelConfig
from lmforge.runtime.models.family_config import activation_fn, base_config, require
from lmforge.runtime.models.layers import PagedAttention, QKVLinear

ARCHITECTURE = "OPTForCausalLM"
POSITION_OFFSET = 2  # OPTLearnedPositionalEmbedding: row p + 2 holds position p


@dataclass(frozen=True, slots=True)
class OPTOptions:
    activation: str  # HF `activation_function`
    pre_layer_norm: bool  # HF `do_layer_norm_before`
    final_layer_norm: bool  # pre-LN and not `_remove_final_layer_norm`
    layer_norm_affine: bool  # HF `layer_norm_elementwise_affine`
    bias: bool  # HF `enable_bias`
    word_embed_proj_dim: int  # embedding width; != hidden: project_in / project_out


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    hidden = require(ARCHITECTURE, hf, "hidden_size")
    heads = require(ARCHITECTURE, hf, "num_attention_heads")
    activation = hf.get("activation_function", "relu")
    activation_fn(ARCHITECTURE, "activation_function", activation)
    pre_ln = bool(hf.get("do_layer_norm_before", True))
    options = OPTOptions(
        activation=activation,
        pre_layer_norm=pre_ln,
        final_layer_norm=pre_ln and not hf.get("_remove_final_layer_norm", False),
        layer_norm_affine=bool(hf.get("layer_norm_elementwise_affine", True)),
        bias=bool(hf.get("enable_bias", True)),
        word_embed_proj_dim=hf.get("word_embed_proj_dim") or hidden,
    )
    return base_config(
        hf,
        architecture=ARCHITECTURE,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=heads,
        num_layers=require(ARCHITECTURE, hf, "num_hidden_layers"),
        intermediate_size=require(ARCHITECTURE, hf, "ffn_dim"),
        max_position_embeddings=require(ARCHITECTURE, hf, "max_position_embeddings"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        family=options,
    )


def _layer_norm(cfg: ModelConfig) -> nn.LayerNorm:
    return nn.LayerNorm(cfg.hidden_size, eps=1e-5, elementwise_affine=cfg.family.layer_norm_affine)


class OPTAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend):
        super().__init__()
        bias = cfg.family.bias
        self.hidden, self.head_dim = cfg.hidden_size, cfg.head_dim
        self.qkv_proj = QKVLinear(cfg.hidden_size, cfg.num_heads, cfg.num_heads, cfg.head_dim, bias)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=bias)
        self.attn = PagedAttention(cfg.num_heads, cfg.num_heads, cfg.head_dim, backend)

    def forward(self, x: torch.Tensor, attn_meta: Any) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = (t.view(num_tokens, -1, self.head_dim) for t in self.qkv_proj(x).split(self.hidden, dim=-1))
        return self.out_proj(self.attn(q, k, v, attn_meta).reshape(num_tokens, self.hidden))


class OPTDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend):
        super().__init__()
        self.pre_ln = cfg.family.pre_layer_norm
        self.self_attn = OPTAttention(cfg, backend)
        self.self_attn_layer_norm = _layer_norm(cfg)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.family.bias)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.family.bias)
        self.act = activation_fn(ARCHITECTURE, "activation_function", cfg.family.activation)
        self.final_layer_norm = _layer_norm(cfg)

    def forward(self, x: torch.Tensor, attn_meta: Any) -> torch.Tensor:
        if self.pre_ln:
            x = x + self.self_attn(self.self_attn_layer_norm(x), attn_meta)
            return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))
        x = self.self_attn_layer_norm(x + self.self_attn(x, attn_meta))
        return self.final_layer_norm(x + self.fc2(self.act(self.fc1(x))))


class OPTDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend):
        super().__init__()
        opts: OPTOptions = cfg.family
        width = opts.word_embed_proj_dim
        self.embed_tokens = nn.Embedding(cfg.vocab_size, width)
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings + POSITION_OFFSET, cfg.hidden_size)
        self.project_in = nn.Linear(width, cfg.hidden_size, bias=False) if width != cfg.hidden_size else None
        self.project_out = nn.Linear(cfg.hidden_size, width, bias=False) if width != cfg.hidden_size else None
        self.layers = nn.ModuleList(OPTDecoderLayer(cfg, backend) for _ in range(cfg.num_layers))
        self.final_layer_norm = _layer_norm(cfg) if opts.final_layer_norm else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_meta: Any) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, word_embed_proj_dim]
        if self.project_in is not None:
            x = self.project_in(x)
        x = x + self.embed_positions(positions + POSITION_OFFSET)  # [T, hidden]
        for layer in self.layers:
            x = layer(x, attn_meta)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        return x if self.project_out is None else self.project_out(x)


class OPTModel(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend):
        super().__init__()
        self.decoder = OPTDecoder(cfg, backend)


class OPTForCausalLM(nn.Module):
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
    }

    def __init__(self, cfg: ModelConfig, max_positions: int, backend: AttentionBackend):
        super().__init__()
        self.config = cfg
        self.model = OPTModel(cfg, backend)
        width = cfg.family.word_embed_proj_dim
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(width, cfg.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_meta: Any) -> torch.Tensor:
        return self.model.decoder(input_ids, positions, attn_meta)  # [T, word_embed_proj_dim]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.model.decoder.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return hidden @ weight.t()

    def attention_layers(self) -> list[PagedAttention]:
        return [cast(OPTDecoderLayer, layer).self_attn.attn for layer in self.model.decoder.layers]
