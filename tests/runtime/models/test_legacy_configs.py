"""Config parsing of the older families: every key that changes their math is read, and every value their
graphs do not implement is refused with a ValueError naming the architecture, the key and the value."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lmforge.kernels.alibi import alibi_slopes
from lmforge.runtime.models.config import ModelConfig, normalize_with_transformers
from lmforge.runtime.models.mpt import mpt_alibi_slopes
from lmforge.runtime.models.tiny_legacy import legacy_hf_config

ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel",
    "opt": "OPTForCausalLM",
    "bloom": "BloomForCausalLM",
    "mpt": "MptForCausalLM",
    "falcon": "FalconForCausalLM",
    "falcon-rw": "FalconForCausalLM",
    "falcon-40b": "FalconForCausalLM",
    "opt-postln": "OPTForCausalLM",
}


def parse(arch: str, **changes: Any) -> ModelConfig:
    hf = {**legacy_hf_config(arch, 384).to_dict(), "architectures": [ARCHITECTURES[arch]]}
    for key, value in changes.items():
        hf[key] = {**hf[key], **value} if isinstance(value, dict) and isinstance(hf.get(key), dict) else value
    return ModelConfig.from_hf(normalize_with_transformers(hf))


REFUSED = [
    ("gpt2", {"add_cross_attention": True}, r"GPT2LMHeadModel: add_cross_attention=True is not supported"),
    ("gpt2", {"activation_function": "quick_gelu"}, r"GPT2LMHeadModel: activation_function='quick_gelu'"),
    (
        "gpt2",
        {"quantization_config": {"quant_method": "compressed-tensors"}},
        r"GPT2LMHeadModel: quantization_config is not supported: .*Conv1D",
    ),
    ("opt", {"activation_function": "tanh"}, r"OPTForCausalLM: activation_function='tanh' is not supported"),
    ("mpt", {"attn_config": {"qk_ln": True}}, r"MptForCausalLM: attn_config.qk_ln=True is not supported"),
    ("mpt", {"attn_config": {"prefix_lm": True}}, r"attn_config.prefix_lm=True"),
    ("mpt", {"attn_config": {"attn_uses_sequence_id": True}}, r"attn_config.attn_uses_sequence_id=True"),
    ("mpt", {"attn_config": {"alibi": False}}, r"attn_config.alibi=False"),
    ("mpt", {"attn_config": {"alibi_bias_max": 16}}, r"attn_config.alibi_bias_max=16"),
    ("mpt", {"attn_config": {"clip_qkv": -1.0}}, r"attn_config.clip_qkv=-1.0 must be positive"),
    ("mpt", {"expansion_ratio": 2}, r"MptForCausalLM: expansion_ratio=2 is not supported"),
    ("mpt", {"no_bias": False}, r"no_bias=False"),
    ("mpt", {"logit_scale": 2.0}, r"logit_scale=2.0"),
    ("mpt", {"norm_type": "rmsnorm"}, r"norm_type='rmsnorm'"),
    ("falcon", {"activation": "tanh"}, r"FalconForCausalLM: activation='tanh' is not supported"),
    ("falcon-40b", {"parallel_attn": False}, r"new_decoder_architecture=True with parallel_attn=False"),
    ("falcon", {"num_ln_in_parallel_attn": 2}, r"num_ln_in_parallel_attn=2 needs new_decoder_architecture"),
    ("falcon-rw", {"num_kv_heads": 2}, r"num_kv_heads=2 without new_decoder_architecture or multi_query"),
    ("falcon-40b", {"num_ln_in_parallel_attn": 3}, r"num_ln_in_parallel_attn=3 is not supported"),
]


@pytest.mark.parametrize(
    "arch, changes, message",
    REFUSED,
    ids=[
        f"{a}-{next(iter(c))}"
        + (f".{next(iter(c.get('attn_config', {})), '')}" if "attn_config" in c else "")
        for a, c, _ in REFUSED
    ],
)
def test_unimplemented_values_are_refused_by_name(arch, changes, message):
    with pytest.raises(ValueError, match=message):
        parse(arch, **changes)


def test_falcon_variants_read_their_layout():
    seven, forty, rw = parse("falcon"), parse("falcon-40b"), parse("falcon-rw")
    assert (seven.num_kv_heads, seven.family.qkv_layout, seven.family.parallel_attn, seven.family.num_ln) == (
        1,
        "multi_query",
        True,
        1,
    )
    assert (forty.num_kv_heads, forty.family.qkv_layout, forty.family.num_ln) == (2, "grouped", 2)
    assert (
        rw.num_kv_heads,
        rw.family.qkv_layout,
        rw.family.parallel_attn,
        rw.family.alibi,
        rw.family.bias,
    ) == (4, "interleaved", False, True, True)


def test_opt_350m_switches_and_gpt2_scales():
    post = parse("opt-postln")
    assert (post.family.pre_layer_norm, post.family.final_layer_norm, post.family.word_embed_proj_dim) == (
        False,
        False,
        32,
    )
    gpt2 = parse("gpt2", scale_attn_weights=False, scale_attn_by_inverse_layer_idx=True)
    assert (gpt2.family.scale_attn_weights, gpt2.family.scale_attn_by_inverse_layer_idx) == (False, True)
    assert (gpt2.intermediate_size, gpt2.max_position_embeddings, gpt2.tie_word_embeddings) == (
        192,
        512,
        True,
    )


@pytest.mark.parametrize("num_heads", [1, 3, 4, 6, 12, 16, 20, 32, 48])
def test_mpt_slopes_are_transformers_bit_for_bit(num_heads):
    """MPT's recipe (next power of two, odd then even) gives kernels.alibi's values up to a few ulp."""
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    bias = build_mpt_alibi_tensor(num_heads, 2)  # [H, 1, 2]: (-slope, 0)
    assert torch.equal(-bias[:, 0, 0], mpt_alibi_slopes(num_heads))
    assert torch.allclose(mpt_alibi_slopes(num_heads), alibi_slopes(num_heads, 8.0), rtol=1e-6, atol=0)
