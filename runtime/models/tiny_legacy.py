"""Tiny random checkpoints of the older families (GPT-2, OPT, BLOOM, MPT, Falcon variants), built with
transformers' own config and model classes and saved as real safetensors, plus the tokenizer of tiny.py.

`widen=True` (the parity tests' setting) replaces HF's std-0.02 init, under which a wrong graph can still
pick the right greedy tokens, by weights with std 1/sqrt(fan_in), random biases and random norm weights:
every part of the graph then moves the logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.runtime.models.tiny import build_tokenizer

LEGACY_ARCHS = (
    "gpt2",
    "opt",
    "opt-postln",
    "bloom",
    "mpt",
    "falcon",
    "falcon-rw",
    "falcon-40b",
    "falcon-11b",
)


def legacy_hf_config(
    arch: str,
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 512,
    **overrides: Any,
):
    """The transformers config of tiny `arch`; `overrides` set config keys (negative controls use them)."""
    from transformers import BloomConfig, FalconConfig, GPT2Config, MptConfig, OPTConfig, PretrainedConfig

    ids: dict[str, Any] = dict(bos_token_id=0, eos_token_id=1, pad_token_id=2)
    config: PretrainedConfig
    if arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_positions=max_positions,
            n_inner=3 * hidden_size,
            **ids,
        )
    elif arch in ("opt", "opt-postln"):
        post = arch == "opt-postln"  # OPT-350m: post-LN blocks, narrower embeddings with project_in/out
        config = OPTConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            ffn_dim=3 * hidden_size,
            max_position_embeddings=max_positions,
            do_layer_norm_before=not post,
            word_embed_proj_dim=hidden_size // 2 if post else hidden_size,
            **ids,
        )
    elif arch == "bloom":
        config = BloomConfig(
            vocab_size=vocab_size, hidden_size=hidden_size, n_layer=num_layers, n_head=num_heads, **ids
        )
    elif arch == "mpt":
        config = MptConfig(
            vocab_size=vocab_size,
            d_model=hidden_size,
            n_layers=num_layers,
            n_heads=num_heads,
            max_seq_len=max_positions,
            expansion_ratio=4,
            attn_config={"clip_qkv": 2.0},
            **ids,
        )
    elif arch.startswith("falcon"):
        variants: dict[str, dict[str, Any]] = {
            "falcon": dict(multi_query=True, parallel_attn=True, new_decoder_architecture=False),  # 7b
            "falcon-rw": dict(alibi=True, multi_query=False, parallel_attn=False, bias=True),  # rw-1b
            "falcon-40b": dict(new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=2),
            "falcon-11b": dict(new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1),
        }
        config = FalconConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            max_position_embeddings=max_positions,
            ffn_hidden_size=3 * hidden_size,
            **variants[arch],
            **ids,
        )
    else:
        raise ValueError(f"unknown tiny legacy arch {arch!r}; choose one of {LEGACY_ARCHS}")
    for key, value in overrides.items():
        if key == "attn_config":
            for sub_key, sub_value in value.items():
                setattr(config.attn_config, sub_key, sub_value)
        else:
            setattr(config, key, value)
    return config


@torch.no_grad()
def widen_weights(model: nn.Module, seed: int) -> None:
    """std 1/sqrt(fan_in) matrices (embeddings: std 1/sqrt(width)), N(0, 0.2) biases, U(0.5, 1.5) norm weights."""
    g = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if param.dim() == 2:
            fan_in = param.shape[1]
            param.copy_(torch.randn(param.shape, generator=g) / fan_in**0.5)
        elif name.endswith("bias"):
            param.copy_(torch.randn(param.shape, generator=g) * 0.2)
        else:  # norm weights
            param.copy_(torch.rand(param.shape, generator=g) + 0.5)


def save_legacy_tiny_model(
    path: str | Path,
    arch: str,
    *,
    seed: int = 0,
    widen: bool = True,
    vocab_size: int = 384,
    dtype: str = "float32",
    **config_kwargs: Any,
) -> Path:
    """Writes a random `arch` checkpoint (`dtype` safetensors: the fp32 draw, cast) + tokenizer to `path`."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    tokenizer = build_tokenizer(vocab_size)
    config = legacy_hf_config(arch, len(tokenizer), **config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if widen:
        widen_weights(model, seed)
    model.to(getattr(torch, dtype)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
