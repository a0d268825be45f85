"""Where AWQ may fold its input-channel scales, per model family: the one table of (module producing an
input, the Linears consuming it) pairs, names within one HF decoder layer.

A pair is only valid when `previous`'s output reaches the consumers and nothing else that would notice
the scaling (a residual, a clamp, a nonlinearity): a pre-norm and every Linear reading it (parallel blocks
list the attention and MLP projections together), v -> the output projection (attention mixes rows of v
linearly), up -> down through a gated MLP (act(gate) * up is linear in up), fc1 -> fc2 through ReLU
(relu(x / s) = relu(x) / s for s > 0). Post-norms, parameter-free norms and GELU MLPs have no pair. When
`previous` is a fused Linear, `rows` names the part of its output the consumers read.

tests/runtime/quantize/test_awq_pairs.py folds random scales into every pair of every family's tiny HF
model and checks the logits do not move: a wrong or missing consumer shows up there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lmforge.runtime.quantize.config import QuantizeError


@dataclass(frozen=True, slots=True)
class ScalePair:
    previous: str
    consumers: tuple[str, ...]
    rows: str | None = (
        None  # fused `previous`: "v_last" ([q | k | v]: the last rows), "v_interleaved" ([H, 3, D]),
    )
    #                          "second_half" ([gate | up]); None: every output channel


def _norm_pairs(norm: str, *consumers: str) -> ScalePair:
    return ScalePair(norm, consumers)


QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
V_O = ScalePair("self_attn.v_proj", ("self_attn.o_proj",))
UP_DOWN = ScalePair("mlp.up_proj", ("mlp.down_proj",))


def _llama(c: dict[str, Any]) -> list[ScalePair]:
    return [
        _norm_pairs("input_layernorm", *QKV),
        V_O,
        _norm_pairs("post_attention_layernorm", *GATE_UP),
        UP_DOWN,
    ]


def _gemma2(c: dict[str, Any]) -> list[ScalePair]:  # post_attention_layernorm norms the attention *output*
    return [
        _norm_pairs("input_layernorm", *QKV),
        V_O,
        _norm_pairs("pre_feedforward_layernorm", *GATE_UP),
        UP_DOWN,
    ]


def _no_norm_pairs(c: dict[str, Any]) -> list[ScalePair]:  # OLMo (no norm weights), OLMo2 (post-norms)
    return [V_O, UP_DOWN]


def _phi3(c: dict[str, Any]) -> list[ScalePair]:
    return [
        _norm_pairs("input_layernorm", "self_attn.qkv_proj"),
        ScalePair("self_attn.qkv_proj", ("self_attn.o_proj",), rows="v_last"),
        _norm_pairs("post_attention_layernorm", "mlp.gate_up_proj"),
        ScalePair("mlp.gate_up_proj", ("mlp.down_proj",), rows="second_half"),
    ]


def _glm(c: dict[str, Any]) -> list[ScalePair]:  # GLM-4 (glm4) adds post-norms after attention / MLP only
    return [
        _norm_pairs("input_layernorm", *QKV),
        V_O,
        _norm_pairs("post_attention_layernorm", "mlp.gate_up_proj"),
        ScalePair("mlp.gate_up_proj", ("mlp.down_proj",), rows="second_half"),
    ]


def _phi(c: dict[str, Any]) -> list[ScalePair]:  # parallel block, one norm; fc1 -> fc2 crosses a GELU
    return [
        _norm_pairs("input_layernorm", *QKV, "mlp.fc1"),
        ScalePair("self_attn.v_proj", ("self_attn.dense",)),
    ]


def _cohere(c: dict[str, Any]) -> list[ScalePair]:  # parallel block, one norm
    return [_norm_pairs("input_layernorm", *QKV, *GATE_UP), V_O, UP_DOWN]


def _stablelm(c: dict[str, Any]) -> list[ScalePair]:
    if c.get("use_parallel_residual"):
        return [_norm_pairs("input_layernorm", *QKV, *GATE_UP), V_O, UP_DOWN]
    return _llama(c)


def _starcoder2(c: dict[str, Any]) -> list[ScalePair]:  # c_fc -> c_proj crosses a GELU
    return [_norm_pairs("input_layernorm", *QKV), V_O, _norm_pairs("post_attention_layernorm", "mlp.c_fc")]


def _gpt_neox(c: dict[str, Any]) -> list[ScalePair]:  # parallel or not, each norm reads the block input
    return [
        _norm_pairs("input_layernorm", "attention.query_key_value"),
        ScalePair("attention.query_key_value", ("attention.dense",), rows="v_interleaved"),
        _norm_pairs("post_attention_layernorm", "mlp.dense_h_to_4h"),
    ]


def _opt(c: dict[str, Any]) -> list[ScalePair]:
    attn = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    pairs = [ScalePair("self_attn.v_proj", ("self_attn.out_proj",))]
    if c.get("do_layer_norm_before", True):  # post-LN OPT-350m: the norms sit after the residual adds
        pairs += [_norm_pairs("self_attn_layer_norm", *attn), _norm_pairs("final_layer_norm", "fc1")]
    if c.get("activation_function", "relu") == "relu":
        pairs.append(ScalePair("fc1", ("fc2",)))
    return pairs


def _bloom(c: dict[str, Any]) -> list[ScalePair]:
    pairs = [ScalePair("self_attention.query_key_value", ("self_attention.dense",), rows="v_interleaved")]
    if not c.get("apply_residual_connection_post_layernorm"):  # else the norm output is also the residual
        pairs += [
            _norm_pairs("input_layernorm", "self_attention.query_key_value"),
            _norm_pairs("post_attention_layernorm", "mlp.dense_h_to_4h"),
        ]
    return pairs


def _mpt(c: dict[str, Any]) -> list[ScalePair]:
    pairs = [_norm_pairs("norm_1", "attn.Wqkv"), _norm_pairs("norm_2", "ffn.up_proj")]
    if not (c.get("attn_config") or {}).get("clip_qkv"):  # the clamp would see v / s
        pairs.append(ScalePair("attn.Wqkv", ("attn.out_proj",), rows="v_last"))
    return pairs


def _falcon(c: dict[str, Any]) -> list[ScalePair]:
    qkv, up = "self_attention.query_key_value", "mlp.dense_h_to_4h"
    new_arch = c.get("new_decoder_architecture")
    num_ln = c.get("num_ln_in_parallel_attn") or (2 if new_arch else 1)
    if c.get("parallel_attn", True) and new_arch and num_ln == 2:
        pairs = [_norm_pairs("ln_attn", qkv), _norm_pairs("ln_mlp", up)]
    elif c.get("parallel_attn", True):
        pairs = [_norm_pairs("input_layernorm", qkv, up)]
    else:
        pairs = [_norm_pairs("input_layernorm", qkv), _norm_pairs("post_attention_layernorm", up)]
    if not new_arch and not c.get("multi_query", True):  # [H, 3, D]; a shared K/V head has no per-head v rows
        pairs.append(ScalePair(qkv, ("self_attention.dense",), rows="v_interleaved"))
    return pairs


# HF config `model_type` -> pairs of one decoder layer (as a function of the config: variants differ)
AWQ_PAIRS: dict[str, Callable[[dict[str, Any]], list[ScalePair]]] = {
    "llama": _llama,
    "mistral": _llama,
    "qwen2": _llama,
    "qwen3": _llama,
    "gemma": _llama,
    "gemma2": _gemma2,
    "gemma3_text": _gemma2,
    "phi3": _phi3,
    "phi": _phi,
    "gpt_neox": _gpt_neox,
    "stablelm": _stablelm,
    "olmo": _no_norm_pairs,
    "olmo2": _no_norm_pairs,
    "starcoder2": _starcoder2,
    "glm": _glm,
    "glm4": _glm,
    "cohere": _cohere,
    "opt": _opt,
    "bloom": _bloom,
    "mpt": _mpt,
    "falcon": _falcon,
}


def pairs_for(hf_config: dict[str, Any]) -> list[ScalePair]:
    """The AWQ pairs of this checkpoint's decoder layers; refuses a family without a table."""
    model_type = hf_config.get("model_type")
    if model_type not in AWQ_PAIRS:
        raise QuantizeError(
            f"w4a16-awq does not know where to fold scales in model_type {model_type!r} (supported: "
            f"{', '.join(sorted(AWQ_PAIRS))}); use w4a16-gptq or w4a16-rtn for this model"
        )
    return AWQ_PAIRS[model_type](hf_config)
