"""GPT-2 (GPT2LMHeadModel) over a paged KV cache: learned absolute positions (wpe), pre-LayerNorm blocks
with biases, a GELU MLP, tied head.

HF stores every projection as a `Conv1D` ([in, out] weights); here they are nn.Linear and the loader
transposes them (`_conv1d_loader`). Module names are HF's, so checkpoint names load unchanged; the hub's
original gpt2 files (no `transformer.` prefix, causal-mask buffers `attn.bias` / `attn.masked_bias`)
load through `hf_to_ours`.
"""

from __future__ import annotations

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
    refuse_true,
    require,
)
from lmforge.runtime.models.layers import PagedAttention, default_weight_loader

ARCHITECTURE = "GPT2LMHeadModel"


@dataclass(frozen=True, slots=True)
class GPT2Options:
    """What the GPT-2 graph reads beyond ModelConfig's shared numbers."""

    activation: str  # HF `activation_function`
    layer_norm_eps: float
    scale_attn_weights: bool  # False: logits are q.k, not q.k / sqrt(D)
    scale_attn_by_inverse_layer_idx: bool  # layer i divides the logits by i + 1 as well


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """GPT2Config -> ModelConfig; refuses what this graph does not implement, naming the key and value."""
    refuse_true(ARCHITECTURE, hf, "add_cross_attention")
    if hf.get("quantization_config"):
        raise FamilyConfigError(
            f"{ARCHITECTURE}: quantization_config is not supported: transformers keeps GPT-2's projections in "
            "Conv1D modules, which compressed-tensors does not quantize (use OPT / Llama-style checkpoints)"
        )
    hidden = require(ARCHITECTURE, hf, "n_embd")
    heads = require(ARCHITECTURE, hf, "n_head")
    activation = hf.get("activation_function", "gelu_new")
    activation_fn(ARCHITECTURE, "activation_function", activation)  # refuses an unknown name now
    options = GPT2Options(
        activation=activation,
        layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        scale_attn_weights=bool(hf.get("scale_attn_weights", True)),
        scale_attn_by_inverse_layer_idx=bool(hf.get("scale_attn_by_inverse_layer_idx", False)),
    )
    # reorder_and_upcast_attn only changes where HF upcasts to fp32: the math is the same, so it is accepted.
    return base_config(
        hf,
        architecture=ARCHITECTURE,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=heads,
        num_layers=require(ARCHITECTURE, hf, "n_layer"),
        intermediate_size=hf.get("n_inner") or 4 * hidden,
        max_position_embeddings=require(ARCHITECTURE, hf, "n_positions"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        family=options,
    )


def _conv1d_loader(param: torch.Tensor, loaded: torch.Tensor) -> None:
    """HF Conv1D weight [in, out] -> nn.Linear weight [out, in]."""
    default_weight_loader(param, loaded.t())


def conv1d_linear(in_features: int, out_features: int) -> nn.Linear:
    linear = nn.Linear(in_features, out_features, bias=True)
    linear.weight.weight_loader = _conv1d_loader  # type: ignore[attr-defined]  # vLLM-style: parameters carry their loader
    return linear


class GPT2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, backend: AttentionBackend):
        super().__init__()
        opts: GPT2Options = cfg.family
        self.hidden, self.head_dim = cfg.hidden_size, cfg.head_dim
        self.c_attn = conv1d_linear(cfg.hidden_size, 3 * cfg.hidden_size)  # [q | k | v]
        self.c_proj = conv1d_linear(cfg.hidden_size, cfg.hidden_size)
        scale = cfg.head_dim**-0.5 if opts.scale_attn_weights else 1.0
        if opts.scale_attn_by_inverse_layer_idx:
            scale /= layer_idx + 1
        self.attn = PagedAttention(cfg.num_heads, cfg.num_heads, cfg.head_dim, backend, scale=scale)

    def forward(self, x: torch.Tensor, attn_meta: Any) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        num_tokens = x.shape[0]
        q, k, v = (t.view(num_tokens, -1, self.head_dim) for t in self.c_attn(x).split(self.hidden, dim=-1))
        return self.c_proj(self.attn(q, k, v, attn_meta).reshape(num_tokens, self.hidden))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = conv1d_linear(cfg.hidden_size, cfg.intermediate_size)
        self.c_proj = conv1d_linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = activation_fn(ARCHITECTURE, "activation_function", cfg.family.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, backend: AttentionBackend):
        super().__init__()
        eps = cfg.family.layer_norm_eps
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=eps)
        self.attn = GPT2Attention(cfg, layer_idx, backend)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=eps)
        self.mlp = GPT2MLP(cfg)

    def forward(self, x: torch.Tensor, attn_meta: Any) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_meta)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: AttentionBackend):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.h = nn.ModuleList(GPT2Block(cfg, i, backend) for i in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.family.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_meta: Any) -> torch.Tensor:
        x = self.wte(input_ids) + self.wpe(positions)  # [T, hidden]
        for block in self.h:
            x = block(x, attn_meta)
        return self.ln_f(x)


class GPT2LMHeadModel(nn.Module):
    _BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers some checkpoints still carry

    def __init__(self, cfg: ModelConfig, max_positions: int, backend: AttentionBackend):
        super().__init__()
        self.config = cfg
        self.transformer = GPT2Model(cfg, backend)
        self.lm_head = (
            None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )

    @classmethod
    def hf_to_ours(cls, name: str) -> str | None:
        """Checkpoint tensor name -> our parameter name (None: not a weight, skipped)."""
        if name.endswith(cls._BUFFERS):
            return None
        if name.startswith(("h.", "wte.", "wpe.", "ln_f.")):  # saved from GPT2Model (the hub's gpt2)
            return f"transformer.{name}"
        return name

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_meta: Any) -> torch.Tensor:
        return self.transformer(input_ids, positions, attn_meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, vocab]
        weight = self.transformer.wte.weight if self.lm_head is None else self.lm_head.weight
        return hidden @ weight.t()

    def attention_layers(self) -> list[PagedAttention]:
        return [cast(GPT2Block, block).attn.attn for block in self.transformer.h]
