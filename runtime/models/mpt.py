"""MPT (MptForCausalLM) over a paged KV cache, as transformers implements it: ALiBi (slopes with
`alibi_bias_max` 8), LayerNorms without bias, no linear biases, fused `Wqkv` ([q | k | v]) optionally
clamped to +-clip_qkv, an exact-GELU MLP (up_proj / down_proj, 4x), tied head.

transformers ignores several MosaicML `attn_config` / config options (it always builds ALiBi with bias
max 8, multi-head attention, no qk LayerNorm, 4x MLP, no biases, no logit scale); a checkpoint that sets
one of them to anything else would be served differently by HF and by MosaicML's own code, so those
values are refused by name instead of being guessed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from lmforge.runtime.models.attention_backend import AttentionBackend
from lmforge.runtime.models.config import ModelConfig
from lmforge.runtime.models.family_config import (
    FamilyConfigError,
    activation_fn,
    base_config,
    refuse_unless,
    require,
)
from lmforge.runtime.models.layers import PagedAttention

ARCHITECTURE = "MptForCausalLM"
# attn_config key -> the only value transformers' MPT graph implements
_ATTN_FIXED: dict[str, tuple[Any, ...]] = {
    "attn_type": ("multihead_attention",),
    "qk_ln": (False,),
    "prefix_lm": (False, None),
    "attn_uses_sequence_id": (False,),
    "alibi": (True,),
    "alibi_bias_max": (8,),
}
_CONFIG_FIXED: dict[str, tuple[Any, ...]] = {
    "expansion_ratio": (4,),
    "no_bias": (True,),
    "logit_scale": (None,),
    "norm_type": ("low_precision_layernorm", "layernorm"),
}


@dataclass(frozen=True, slots=True)
class MptOptions:
    layer_norm_eps: float
    softmax_scale: float | None  # None: head_dim ** -0.5
    clip_qkv: float | None


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    attn = dict(hf.get("attn_config") or {})
    for key, allowed in _ATTN_FIXED.items():
        if key in attn:
            refuse_unless(ARCHITECTURE, f"attn_config.{key}", attn[key], allowed)
    for key, allowed in _CONFIG_FIXED.items():
        if key in hf:
            refuse_unless(ARCHITECTURE, key, hf[key], allowed)
    hidden = hf.get("d_model") or require(ARCHITECTURE, hf, "hidden_size")
    heads = hf.get("n_heads") or require(ARCHITECTURE, hf, "num_attention_heads")
    clip = attn.get("clip_qkv")
    if clip is not None and not clip > 0:
        raise FamilyConfigError(f"{ARCHITECTURE}: attn_config.clip_qkv={clip!r} must be positive or null")
    options = MptOptions(
        layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        softmax_scale=attn.get("softmax_scale"),
        clip_qkv=clip,
    )
    return base_config(
        hf,
        architecture=ARCHITECTURE,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=heads,
        num_layers=hf.get("n_layers") or require(ARCHITECTURE, hf, "num_hidden_layers"),
        intermediate_size=4 * hidden,
        max_position_embeddings=require(ARCHITECTURE, hf, "max_seq_len"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        family=options,
    )


def mpt_alibi_slopes(num_heads: int, alibi_bias_max: float = 8.0) -> torch.Tensor:
    """[H] fp32 slopes exactly as transformers' `build_mpt_alibi_tensor` (MosaicML's recipe): 1 / 2^(8k/P)
    for the next power of two P, odd-indexed then even-indexed. The same numbers as kernels.alibi's, but
    computed as a power of 2 rather than a power of a rounded base: they differ by a few ulp from 12 heads on,
    which a 2k-token distance turns into ~1e-4 of logit."""
    power = 2 ** math.ceil(math.log2(num_heads))
    base = torch.arange(1, power + 1, dtype=torch.int64).float() * (alibi_bias_max / power)
    slopes = 1.0 / torch.pow(2, base)
    if power != num_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:num_heads]
    return slopes


def _norm(cfg: ModelConfig) -> nn.LayerNorm:
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.family.layer_norm_eps, bias=False)


class MptAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend):
        super().__init__()
        self.hidden, self.head_dim, self.clip_qkv = cfg.hidden_size, cfg.head_dim, cfg.family.clip_qkv
        self.Wqkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.attn = PagedAttention(
            cfg.num_heads,
            cfg.num_heads,
            cfg.head_dim,
            backend,
            scale=cfg.family.softmax_scale,
            alibi_slopes=mpt_alibi_slopes(cfg.num_heads),
        )

    def forward(self, x: torch.Tensor, attn_meta: Any) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.Wqkv(x)
        if self.clip_qkv is not None:
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        q, k, v = (t.reshape(num_tokens, -1, self.head_dim) for t in qkv.split(self.hidden, dim=-1))
        return self.out_proj(self.attn(q, k, v, attn_meta).reshape(num_tokens, self.hidden))


class MptMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = activation_fn(ARCHITECTURE, "MptMLP.act", "gelu")  # nn.GELU(approximate="none")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


class MptBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend):
        super().__init__()
        self.norm_1, self.attn = _norm(cfg), MptAttention(cfg, backend)
        self.norm_2, self.ffn = _norm(cfg), MptMLP(cfg)

    def forward(self, x: torch.Tensor, attn_meta: Any) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x), attn_meta)
        return x + self.ffn(self.norm_2(x))


class MptModel(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(MptBlock(cfg, backend) for _ in range(cfg.num_layers))
        self.norm_f = _norm(cfg)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_meta: Any) -> torch.Tensor:
        x = self.wte(input_ids)  # positions: ALiBi, in attention
        for block in self.blocks:
            x = block(x, attn_meta)
        return self.norm_f(x)


class MptForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int, backend: AttentionBackend):
        super().__init__()
        self.config = cfg
        self.transformer = MptModel(cfg, backend)
        self.lm_head = (
            None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_meta: Any) -> torch.Tensor:
        return self.transformer(input_ids, positions, attn_meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.transformer.wte.weight if self.lm_head is None else self.lm_head.weight
        return hidden @ weight.t()

    def attention_layers(self) -> list[PagedAttention]:
        return [cast(MptBlock, block).attn.attn for block in self.transformer.blocks]
