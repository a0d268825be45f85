"""The model-family table: for each architecture, every HF config key its transformers modeling file
reads that changes the math, the values we implement, and how they map onto `ModelConfig`.

A key outside `accepts` is refused with a ValueError naming the architecture, the key and the
value; a key a builder reads must be in its family's table (so the table is the whole story, and
`tests/runtime/models/test_families.py` enumerates it). Pure: no torch, no transformers.

Weight names: `hf_to_ours` renames checkpoint substrings onto our module names (one regex pass,
so renames never chain); `packed` routes HF's separate projections into our fused ones.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lmforge.runtime.models.config import MLAConfig, MoEConfig

REQUIRED = object()  # a Key default: config.json must carry the key

# HF activation name (transformers ACT2FN) -> our canonical one (config.ACTIVATIONS).
# gelu_new and gelu_pytorch_tanh are the same tanh approximation.
HF_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
}
# RoPE types kernels/rope_cache.py computes exactly like transformers (its ROPE_TYPES; "su": Phi-3's old name).
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope", "dynamic", "su")
LAYER_TYPES = ("full_attention", "sliding_attention")
BOOLS = (True, False)


@dataclass(frozen=True, slots=True)
class Key:
    """One config key: its default when absent (transformers' default) and the values we implement
    (None: any value, e.g. sizes and eps). `each`: the value is a list and every element must be
    accepted (layer_types)."""

    default: Any = None
    accepts: tuple[Any, ...] | None = None
    each: bool = False
    why: str = ""  # said when a value is refused: what is missing


@dataclass(frozen=True)
class Family:
    model_type: str
    keys: dict[str, Key]
    build: Callable[[Reader], dict[str, Any]]  # reader -> ModelConfig fields beyond the shapes
    hf_to_ours: dict[str, str] = field(default_factory=dict)
    packed: dict[str, tuple[str, Any]] = field(default_factory=dict)


class Reader:
    """Reads one family's keys from an HF config dict, validating each against the table."""

    def __init__(self, architecture: str, family: Family, hf: dict[str, Any]):
        self.architecture, self.family, self.hf = architecture, family, hf

    def __call__(self, key: str) -> Any:
        spec = self.family.keys.get(key)
        if spec is None:
            raise AssertionError(f"{self.architecture}: builder reads {key!r}, which its table does not list")
        value = self._raw(key, spec.default)
        if value is REQUIRED:
            raise ValueError(f"{self.architecture}: config.json lacks the key {key!r}")
        values = (value or []) if spec.each else [value]
        for v in values:
            if spec.accepts is not None and v not in spec.accepts:
                why = f" ({spec.why})" if spec.why else ""
                raise ValueError(
                    f"{self.architecture}: config key {key!r} = {v!r} is not supported{why}; "
                    f"supported: {', '.join(map(repr, spec.accepts))}"
                )
        return value

    def _raw(self, key: str, default: Any) -> Any:
        """Plain keys from the top level; the RoPE keys from `rope_parameters` (transformers>=5) or the
        top level + `rope_scaling` (transformers<5)."""
        if key in ("rope_theta", "rope_type", "partial_rotary_factor"):
            rope = _rope_dict(self.hf)
            if key == "rope_type":
                return rope.get("rope_type", rope.get("type", default))
            return rope.get(key, self.hf.get(key, default))
        if "." in key:  # a nested config (DBRX's attn_config / ffn_config): "attn_config.clip_qkv"
            outer, inner = key.split(".", 1)
            nested = self.hf.get(outer) or {}
            return nested[inner] if inner in nested else default
        return self.hf[key] if key in self.hf else default


def _rope_dict(hf: dict[str, Any]) -> dict[str, Any]:
    params = hf.get("rope_parameters")
    if params and "rope_type" not in params and any(k in LAYER_TYPES for k in params):
        params = params.get("full_attention") or {}  # Gemma3: one dict per layer type
    return dict(params or hf.get("rope_scaling") or {})


def _scaling(rope: dict[str, Any]) -> dict[str, Any] | None:
    """The rope_scaling entry of ModelConfig: None for plain RoPE, else the dict with 'rope_type'."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return None
    drop = ("rope_theta", "partial_rotary_factor", "type")
    return {**{k: v for k, v in rope.items() if k not in drop}, "rope_type": rope_type}


# --- key sets shared by the families ------------------------------------------------------------

SHAPE_KEYS = {
    "vocab_size": Key(REQUIRED),
    "hidden_size": Key(REQUIRED),
    "intermediate_size": Key(REQUIRED),
    "num_hidden_layers": Key(REQUIRED),
    "num_attention_heads": Key(REQUIRED),
    "num_key_value_heads": Key(None),
    "head_dim": Key(None),
    "max_position_embeddings": Key(4096),
    "tie_word_embeddings": Key(False),
}


def _rope_keys(theta: float = 10000.0, partial: bool = False, partial_default: float = 1.0) -> dict[str, Key]:
    return {
        "rope_theta": Key(theta),
        "rope_type": Key("default", SUPPORTED_ROPE_TYPES, why="kernels/rope_cache.py implements these"),
        "partial_rotary_factor": Key(
            partial_default,
            None if partial else (1.0,),
            why="" if partial else "this family's transformers code rotates whole heads",
        ),
    }


def _act(default: str = "silu", key: str = "hidden_act") -> dict[str, Key]:
    return {key: Key(default, tuple(HF_ACTIVATIONS))}


def _shapes(r: Reader) -> dict[str, Any]:
    """GPT-NeoX's table has no num_key_value_heads / head_dim: its transformers code derives them."""
    heads = r("num_attention_heads")
    hidden = r("hidden_size")
    kv_heads = r("num_key_value_heads") if "num_key_value_heads" in r.family.keys else None
    head_dim = r("head_dim") if "head_dim" in r.family.keys else None
    return dict(
        vocab_size=r("vocab_size"),
        hidden_size=hidden,
        intermediate_size=r("intermediate_size"),
        num_layers=r("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads or heads,
        head_dim=head_dim or hidden // heads,
        max_position_embeddings=r("max_position_embeddings"),
        tie_word_embeddings=bool(r("tie_word_embeddings")),
    )


def _rope(r: Reader, head_dim: int) -> dict[str, Any]:
    r("rope_type")
    factor = float(r("partial_rotary_factor"))
    rotary_dim = int(head_dim * factor)
    return dict(
        rope_theta=float(r("rope_theta")),
        rope_scaling=_scaling(_rope_dict(r.hf)),
        rotary_dim=None if rotary_dim == head_dim else rotary_dim,
    )


def _windows(num_layers: int, window: int | None, layer_types: list[str] | None) -> tuple[int | None, ...]:
    """Per-layer windows: `window` on the layers typed "sliding_attention" (every layer without types)."""
    if not window:
        return ()
    if layer_types is None:
        return (int(window),) * num_layers
    if len(layer_types) != num_layers:
        raise ValueError(f"layer_types has {len(layer_types)} entries for {num_layers} layers")
    return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)


def _qwen_windows(r: Reader, num_layers: int) -> tuple[int | None, ...]:
    """Qwen2/Qwen3: `sliding_window` only with `use_sliding_window`, on the layers from
    `max_window_layers` on (or as `layer_types` says)."""
    window = r("sliding_window") if r("use_sliding_window") else None
    max_window_layers = r("max_window_layers")
    types = r("layer_types")
    if types is None and window:
        types = [
            "sliding_attention" if i >= max_window_layers else "full_attention" for i in range(num_layers)
        ]
    return _windows(num_layers, window, types)


# --- the families -------------------------------------------------------------------------------


def _llama(r: Reader) -> dict[str, Any]:
    s = _shapes(r)
    bias = bool(r("attention_bias"))
    return dict(
        **s,
        **_rope(r, s["head_dim"]),
        rms_norm_eps=r("rms_norm_eps"),
        hidden_act=HF_ACTIVATIONS[r("hidden_act")],
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bool(r("mlp_bias")),
    )


def _mistral(r: Reader) -> dict[str, Any]:
    s = _shapes(r)
    return dict(
        **s,
        **_rope(r, s["head_dim"]),
        rms_norm_eps=r("rms_norm_eps"),
        hidden_act=HF_ACTIVATIONS[r("hidden_act")],
        layer_sliding_windows=_windows(s["num_layers"], r("sliding_window"), None),
    )


def _qwen2(r: Reader) -> dict[str, Any]:
    s = _shapes(r)
    return dict(
        **s,
        **_rope(r, s["head_dim"]),
        rms_norm_eps=r("rms_norm_eps"),
        hidden_act=HF_ACTIVATIONS[r("hidden_act")],
        qkv_bias=True,
        layer_sliding_windows=_qwen_windows(r, s["num_layers"]),
    )


def _qwen3(r: Reader) -> dict[str, Any]:
    s = _shapes(r)
    bias = bool(r("attention_bias"))
    return dict(
        **s,
        **_rope(r, s["head_dim"]),
        rms_norm_eps=r("rms_norm_eps"),
        hidden_act=HF_ACTIVATIONS[r("hidden_act")],
        qkv_bias=bias,
        o_bias=bias,
        qk_norm="head",
        layer_sliding_windows=_qwen_windows(r, s["num_layers"]),
    )


def _gemma(r: Reader) -> dict[str, Any]:
    s = _shapes(r)
    bias = bool(r("attention_bias"))
    return dict(
        **s,
        **_rope(r, s["head_dim"]),
        rms_norm_eps=r("rms_norm_eps"),
        norm="rms_1p",
        hidden_act=HF_ACTIVATIONS[r("hidden_act")],
        qkv_bias=bias,
        o_bias=bias,
        embedding_multiplier=math.sqrt(s["hidden_size"]),
    )


def _gemma2(r: Reader) -> dict[str, Any]:
    s = _shapes(r)
    bias = bool(r("attention_bias"))
    return dict(
        **s,
        **_rope(r, s["head_dim"]),
        rms_norm_eps=r("rms_norm_eps"),
        norm="rms_1p",
        layout="sandwich",
        hidden_act=HF_ACTIVATIONS[r("hidden_activation")],
        qkv_bias=bias,
        o_bias=bias,
        embedding_multiplier=math.sqrt(s["hidden_size"]),
        attn_scale=float(r("query_pre_attn_scalar")) ** -0.5,
        attn_logit_softcap=r("attn_logit_softcapping"),
        final_logit_softcap=r("final_logit_softcapping"),
        layer_sliding_windows=_windows(s["num_layers"], r("sliding_window"), r("layer_types")),
    )


def _gemma3(r: Reader) -> dict[str, Any]:
    fields = _gemma2(r)
    r("use_bidirectional_attention")
    types = r("layer_types") or ["sliding_attention"] * fields["num_layers"]
    fields["local_rope_layers"] = tuple(t == "sliding_attention" for t in types)
    local = dict((r.hf.get("rope_parameters") or {}).get("sliding_attention") or {})
    if local:
        rope_type = local.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"{r.architecture}: config key 'rope_type' = {rope_type!r} (sliding_attention) is not "
                f"supported; supported: {', '.join(map(repr, SUPPORTED_ROPE_TYPES))}"
            )
        fields.update(
            local_rope_theta=float(local.get("rope_theta", 10000.0)), local_rope_scaling=_scaling(local)
        )
    else:  # transformers<5 layout: rope_local_base_freq, plain RoPE on the sliding layers
        fields.update(local_rope_theta=float(r("rope_local_base_freq")))
    return {**fields, "qk_norm": "head"}


def _phi3(r: Reader) -> dict[str, Any]:
    s = _shapes(r)
    return dict(
        **s,
        **_rope(r, s["head_dim"]),
        rms_norm_eps=r("rms_norm_eps"),
        hidden_act=HF_ACTIVATIONS[r("hidden_act")],
        layer_sliding_windows=_windows(s["num_layers"], r("sliding_window"), None),
    )


def _phi(r: Reader) -> dict[str, Any]:
    s = _shapes(r)
    return dict(
        **s,
        **_rope(r, s["head_dim"]),
        rms_norm_eps=r("layer_norm_eps"),
        norm="layer",
        layout="parallel",
        hidden_act=HF_ACTIVATIONS[r("hidden_act")],
        gated_mlp=False,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        lm_head_bias=True,
        qk_norm="head_layer" if r("qk_layernorm") else None,
    )


def _gpt_neox(r: Reader) -> dict[str, Any]:
    s = _shapes(r)
    bias = bool(r("attention_bias"))
    return dict(
        **s,
        **_rope(r, s["head_dim"]),
        rms_norm_eps=r("layer_norm_eps"),
        norm="layer",
        layout="parallel_2norm" if r("use_parallel_residual") else "pre",
        hidden_act=HF_ACTIVATIONS[r("hidden_act")],
        gated_mlp=False,
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=True,
    )


def _stablelm(r: Reader) -> dict[str, Any]:
    s = _shapes(r)
    return dict(
        **s,
        **_rope(r, s["head_dim"]),
        rms_norm_eps=r("layer_norm_eps"),
        norm="layer",
        layout="parallel" if r("use_parallel_residual") else "pre",
        hidden_act=HF_ACTIVATIONS[r("hidden_act")],
        qkv_bias=bool(r("use_qkv_bias")),
        qk_norm="head_layer_modules" if r("qk_layernorm") else None,
    )


def _olmo(r: Reader) -> dict[str, Any]:
    s = _shapes(r)
    bias = bool(r("attention_bias"))
    return dict(
        **s,
        **_rope(r, s["head_dim"]),
        rms_norm_eps=1e-5,
        norm="layer_no_affine",  # OlmoLayerNorm: fixed
        hidden_act=HF_ACTIVATIONS[r("hidden_act")],
        qkv_bias=bias,
        o_bias=bias,
        clip_qkv=r("clip_qkv"),
    )


def _olmo2(r: Reader) -> dict[str, Any]:
    s = _shapes(r)
    bias = bool(r("attention_bias"))
    return dict(
        **s,
        **_rope(r, s["head_dim"]),
        rms_norm_eps=r("rms_norm_eps"),
        layout="post",
        qk_norm="full",
        hidden_act=HF_ACTIVATIONS[r("hidden_act")],
        qkv_bias=bias,
        o_bias=bias,
    )


def _starcoder2(r: Reader) -> dict[str, Any]:
    s = _shapes(r)
    bias = bool(r("use_bias"))
    return dict(
        **s,
        **_rope(r, s["head_dim"]),
        rms_norm_eps=r("norm_epsilon"),
        norm="layer",
        gated_mlp=False,
        hidden_act=HF_ACTIVATIONS[r("hidden_act")],
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bias,
        layer_sliding_windows=_windows(s["num_layers"], r("sliding_window"), None),
    )


def _glm(r: Reader) -> dict[str, Any]:
    s = _shapes(r)
    return dict(
        **s,
        **_rope(r, s["head_dim"]),
        rms_norm_eps=r("rms_norm_eps"),
        rope_is_neox_style=False,
        hidden_act=HF_ACTIVATIONS[r("hidden_act")],
        qkv_bias=bool(r("attention_bias")),
    )


def _glm4(r: Reader) -> dict[str, Any]:
    return {**_glm(r), "layout": "sandwich"}


def _cohere(r: Reader) -> dict[str, Any]:
    s = _shapes(r)
    bias = bool(r("attention_bias"))
    return dict(
        **s,
        **_rope(r, s["head_dim"]),
        rms_norm_eps=r("layer_norm_eps"),
        norm="layer_no_bias",
        layout="parallel",
        rope_is_neox_style=False,
        hidden_act=HF_ACTIVATIONS[r("hidden_act")],
        qkv_bias=bias,
        o_bias=bias,
        logit_scale=float(r("logit_scale")),
        qk_norm="head_layer_per_head" if r("use_qk_norm") else None,
    )


# --- mixture-of-experts and latent-attention families ------------------------------------------


def _moe_layers(num_layers: int, sparse: Callable[[int], bool]) -> tuple[bool, ...]:
    return tuple(sparse(i) for i in range(num_layers))


def _mixtral(r: Reader) -> dict[str, Any]:
    """Mixtral: softmax over the experts, top-k, renormalised; every layer sparse."""
    fields = _mistral(r)
    fields["moe"] = MoEConfig(
        num_experts=r("num_local_experts"),
        top_k=r("num_experts_per_tok"),
        intermediate_size=fields["intermediate_size"],
        layers=(True,) * fields["num_layers"],
    )
    return fields


def _qwen2_moe(r: Reader) -> dict[str, Any]:
    """Qwen1.5/2-MoE: softmax top-k (renormalised only with norm_topk_prob), plus a shared expert whose
    output is gated by sigmoid(shared_expert_gate(x)); layer i is sparse when (i + 1) % decoder_sparse_step
    == 0 and i is not in mlp_only_layers."""
    s = _shapes(r)
    step, dense_only = r("decoder_sparse_step"), set(r("mlp_only_layers") or [])
    num_experts = r("num_experts")
    if step < 1:
        raise ValueError(f"{r.architecture}: config key 'decoder_sparse_step' = {step!r} must be >= 1")
    return dict(
        **s,
        **_rope(r, s["head_dim"]),
        rms_norm_eps=r("rms_norm_eps"),
        hidden_act=HF_ACTIVATIONS[r("hidden_act")],
        qkv_bias=bool(r("qkv_bias")),
        layer_sliding_windows=_qwen_windows(r, s["num_layers"]),
        moe=MoEConfig(
            num_experts=num_experts,
            top_k=r("num_experts_per_tok"),
            intermediate_size=r("moe_intermediate_size"),
            layers=_moe_layers(
                s["num_layers"], lambda i: num_experts > 0 and i not in dense_only and (i + 1) % step == 0
            ),
            renormalize=bool(r("norm_topk_prob")),
            weights_in_logits_dtype=True,
            shared_intermediate_size=r("shared_expert_intermediate_size"),
            shared_gate=True,
        ),
    )


def _mla(r: Reader) -> MLAConfig:
    return MLAConfig(
        kv_lora_rank=r("kv_lora_rank"),
        q_lora_rank=r("q_lora_rank"),
        nope_head_dim=r("qk_nope_head_dim"),
        rope_head_dim=r("qk_rope_head_dim"),
        v_head_dim=r("v_head_dim"),
        attention_bias=bool(r("attention_bias")),
    )


def _mla_shapes(r: Reader) -> dict[str, Any]:
    """Shapes of an MLA model: ModelConfig.head_dim is the rotated part (what transformers' config calls
    head_dim and its RoPE rotates); one latent "KV head"."""
    s = _shapes(r)
    rope_dim = r("qk_rope_head_dim")
    if r("head_dim") not in (None, rope_dim):
        raise ValueError(
            f"{r.architecture}: config key 'head_dim' = {r('head_dim')!r} differs from qk_rope_head_dim "
            f"= {rope_dim}: transformers' RoPE rotates head_dim dims of the rope part"
        )
    kv_heads = r("num_key_value_heads")
    if kv_heads not in (None, s["num_heads"]):
        raise ValueError(
            f"{r.architecture}: config key 'num_key_value_heads' = {kv_heads!r} is not supported "
            f"(latent attention expands the latent to all {s['num_heads']} heads)"
        )
    return {**s, "head_dim": rope_dim, "num_kv_heads": 1}


def _deepseek(r: Reader, v3: bool) -> dict[str, Any]:
    s = _mla_shapes(r)
    freq = r("moe_layer_freq")
    first_dense = r("first_k_dense_replace") or 0
    num_experts = r("n_routed_experts")
    grouped = v3 or r("topk_method") == "group_limited_greedy"
    if not v3:
        r("norm_topk_prob")  # transformers' DeepseekV2 router never renormalises: only False is accepted
        r("scoring_func")
    else:
        r("topk_method"), r("scoring_func")
    moe = MoEConfig(
        num_experts=num_experts,
        top_k=r("num_experts_per_tok"),
        intermediate_size=r("moe_intermediate_size"),
        layers=_moe_layers(s["num_layers"], lambda i: i >= first_dense and i % freq == 0),
        scoring="sigmoid" if v3 else "softmax",
        renormalize=bool(r("norm_topk_prob")) if v3 else False,
        renorm_eps=1e-20 if v3 else 0.0,
        routed_scaling=float(r("routed_scaling_factor")),
        num_groups=r("n_group") if grouped else None,
        topk_groups=r("topk_group") if grouped else None,
        group_score="top2_sum" if v3 else "max",
        group_fill=float("-inf") if v3 else 0.0,
        score_correction_bias=v3,
        router_fp32=True,
        shared_intermediate_size=r("moe_intermediate_size") * (r("n_shared_experts") or 0),
    )
    # V3 checkpoints carry num_nextn_predict_layers multi-token-prediction layers after the last one,
    # which transformers' forward never runs (it skips them at load): ours skip them too
    mtp = r("num_nextn_predict_layers") if v3 else 0
    return dict(
        **s,
        **_rope(r, s["head_dim"]),
        skipped_layers=tuple(range(s["num_layers"], s["num_layers"] + (mtp or 0))),
        rms_norm_eps=r("rms_norm_eps"),
        hidden_act=HF_ACTIVATIONS[r("hidden_act")],
        mlp_bias=bool(r("mlp_bias")) if "mlp_bias" in r.family.keys else False,
        rope_is_neox_style=not (r("rope_interleave") if v3 else True),  # V2: complex pairs (2i, 2i+1)
        mla=_mla(r),
        moe=moe,
    )


def _minicpm3(r: Reader) -> dict[str, Any]:
    """MiniCPM3: DeepSeek-V2's latent attention (rotate_half RoPE) in a dense model, with scaled
    embeddings (x scale_emb), scaled sublayer outputs (x scale_depth / sqrt(L)) and logits of
    hidden / (hidden_size / dim_model_base)."""
    s = _mla_shapes(r)
    return dict(
        **s,
        **_rope(r, s["head_dim"]),
        rms_norm_eps=r("rms_norm_eps"),
        hidden_act=HF_ACTIVATIONS[r("hidden_act")],
        mlp_bias=bool(r("mlp_bias")),
        mla=_mla(r),
        embedding_multiplier=float(r("scale_emb")),
        residual_multiplier=float(r("scale_depth")) / math.sqrt(s["num_layers"]),
        logits_divisor=s["hidden_size"] / float(r("dim_model_base")),
    )


def _phimoe(r: Reader) -> dict[str, Any]:
    """Phi-3.5-MoE: LayerNorms (with bias), attention and lm_head biases, and sparsemixer routing (top-2:
    the best expert and the best of the rest, each weighted by a softmax over the experts within
    2 * router_jitter_noise of it, relatively). Its longrope scales cos/sin by short_mscale / long_mscale,
    which must agree (then they are longrope's attention_factor), and uses short_factor at every length
    as transformers does."""
    s = _shapes(r)
    bias = bool(r("attention_bias"))
    fields = dict(
        **s,
        **_rope(r, s["head_dim"]),
        rms_norm_eps=r("rms_norm_eps"),
        norm="layer",
        hidden_act=HF_ACTIVATIONS[r("hidden_act")],
        qkv_bias=bias,
        o_bias=bias,
        lm_head_bias=bool(r("lm_head_bias")),
        layer_sliding_windows=_windows(s["num_layers"], r("sliding_window"), None),
    )
    scaling = fields["rope_scaling"]
    if scaling is not None and ("short_mscale" in scaling or "long_mscale" in scaling):
        short, long = scaling.pop("short_mscale", None), scaling.pop("long_mscale", None)
        if short != long or scaling.get("attention_factor") is not None:
            raise ValueError(
                f"{r.architecture}: rope_scaling short_mscale={short!r} and long_mscale={long!r} differ "
                "(or come with attention_factor): only one cos/sin scale for both lengths is supported"
            )
        scaling["attention_factor"] = float(short)
    if scaling is not None and scaling.get("rope_type") in ("longrope", "su"):
        # transformers' Phimoe forward recomputes the frequencies without the sequence length, so it
        # rotates with short_factor at every length (Microsoft's code switches to long_factor past
        # original_max_position_embeddings); we serve what transformers computes
        scaling["long_factor"] = list(scaling["short_factor"])
    r("num_experts_per_tok")
    fields["moe"] = MoEConfig(
        num_experts=r("num_local_experts"),
        top_k=2,
        intermediate_size=s["intermediate_size"],
        layers=(True,) * s["num_layers"],
        scoring="sparsemixer",
        renormalize=False,
        jitter_eps=float(r("router_jitter_noise")),
    )
    return fields


def _dbrx(r: Reader) -> dict[str, Any]:
    """DBRX: bias-free LayerNorms, fused Wqkv with clip_qkv, plain RoPE at attn_config.rope_theta, and
    softmax top-k experts whose weights are divided by their p-norm (moe_normalize_expert_weights = p;
    only p = 1, a plain renormalisation, or None). The experts are stored stacked (w1, v1, w2: [E*I, H])."""
    hidden, heads = r("d_model"), r("n_heads")
    theta = float(r("attn_config.rope_theta"))
    r("rope_type")
    params_theta = float(r("rope_theta"))
    if params_theta not in (theta, 10000.0):
        raise ValueError(
            f"{r.architecture}: rope_parameters rope_theta = {params_theta!r} and attn_config.rope_theta = "
            f"{theta!r} disagree: which one the checkpoint was trained with is ambiguous"
        )
    r("ffn_config.ffn_act_fn")
    layers = r("n_layers")
    p = r("ffn_config.moe_normalize_expert_weights")
    return dict(
        vocab_size=r("vocab_size"),
        hidden_size=hidden,
        intermediate_size=r("ffn_config.ffn_hidden_size"),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=r("attn_config.kv_n_heads"),
        head_dim=hidden // heads,
        max_position_embeddings=r("max_seq_len"),
        tie_word_embeddings=bool(r("tie_word_embeddings")),
        rope_theta=theta,
        rms_norm_eps=1e-5,  # nn.LayerNorm's default: DBRX's norms take no eps from the config
        norm="layer_no_bias",
        clip_qkv=r("attn_config.clip_qkv"),
        moe=MoEConfig(
            num_experts=r("ffn_config.moe_num_experts"),
            top_k=r("ffn_config.moe_top_k"),
            intermediate_size=r("ffn_config.ffn_hidden_size"),
            layers=(True,) * layers,
            renormalize=p is not None,
            weights_in_logits_dtype=True,
        ),
    )


_MOE_KEYS = {"num_experts_per_tok": Key(2)}
_MLA_KEYS = {
    "kv_lora_rank": Key(512),
    "q_lora_rank": Key(1536),
    "qk_nope_head_dim": Key(128),
    "qk_rope_head_dim": Key(64),
    "v_head_dim": Key(128),
    "attention_bias": Key(False, BOOLS),
}
_DEEPSEEK_KEYS = {
    **_MLA_KEYS,
    "n_routed_experts": Key(64),
    "n_shared_experts": Key(2),
    "moe_intermediate_size": Key(1407),
    "first_k_dense_replace": Key(0),
    "moe_layer_freq": Key(
        1, (1,), why="transformers' DeepSeek models make every layer from first_k_dense_replace on sparse"
    ),
    "routed_scaling_factor": Key(1.0),
    "n_group": Key(None),
    "topk_group": Key(None),
    "rms_norm_eps": Key(1e-6),
    "mlp_bias": Key(False, BOOLS),
}
_MLP_PACKED = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}  # MLA: no q/k/v
_DEEPSEEK_RENAMES = {".mlp.shared_experts.": ".mlp.shared_expert."}

_NEOX_SHAPE_KEYS = {k: v for k, v in SHAPE_KEYS.items() if k not in ("num_key_value_heads", "head_dim")}
_LLAMA_PACKED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
_QKV_PACKED = {k: v for k, v in _LLAMA_PACKED.items() if v[0] == "qkv_proj"}
_WINDOW_KEYS = {"sliding_window": Key(None)}
_MISTRAL_WINDOW_KEYS = {"sliding_window": Key(4096)}  # transformers' MistralConfig default
_QWEN_WINDOW_KEYS = {
    "use_sliding_window": Key(False, BOOLS),
    "sliding_window": Key(4096),
    "max_window_layers": Key(28),
    "layer_types": Key(None, LAYER_TYPES, each=True),
}
_GEMMA2_KEYS = {
    "attention_bias": Key(False, BOOLS),
    "rms_norm_eps": Key(1e-6),
    "query_pre_attn_scalar": Key(256),
    "attn_logit_softcapping": Key(50.0),
    "final_logit_softcapping": Key(30.0),
    "sliding_window": Key(4096),
    "layer_types": Key(None, LAYER_TYPES, each=True),
}
# Gemma2/3 name their norms after where they sit; ours: input_layernorm (before attention),
# post_attention_layernorm (before the MLP), attn_out_norm / mlp_out_norm (on the sublayer outputs).
_SANDWICH_GEMMA = {
    ".post_attention_layernorm.": ".attn_out_norm.",
    ".pre_feedforward_layernorm.": ".post_attention_layernorm.",
    ".post_feedforward_layernorm.": ".mlp_out_norm.",
}

FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family(
        "llama",
        {
            **SHAPE_KEYS,
            **_act(),
            **_rope_keys(),
            "rms_norm_eps": Key(1e-6),
            "attention_bias": Key(False, BOOLS),
            "mlp_bias": Key(False, BOOLS),
        },
        _llama,
        packed=_LLAMA_PACKED,
    ),
    "MistralForCausalLM": Family(
        "mistral",
        {**SHAPE_KEYS, **_act(), **_rope_keys(), "rms_norm_eps": Key(1e-6), **_MISTRAL_WINDOW_KEYS},
        _mistral,
        packed=_LLAMA_PACKED,
    ),
    "Qwen2ForCausalLM": Family(
        "qwen2",
        {**SHAPE_KEYS, **_act(), **_rope_keys(), "rms_norm_eps": Key(1e-6), **_QWEN_WINDOW_KEYS},
        _qwen2,
        packed=_LLAMA_PACKED,
    ),
    "Qwen3ForCausalLM": Family(
        "qwen3",
        {
            **SHAPE_KEYS,
            **_act(),
            **_rope_keys(),
            "rms_norm_eps": Key(1e-6),
            "attention_bias": Key(False, BOOLS),
            **_QWEN_WINDOW_KEYS,
        },
        _qwen3,
        packed=_LLAMA_PACKED,
    ),
    "GemmaForCausalLM": Family(
        "gemma",
        {
            **SHAPE_KEYS,
            **_act("gelu_pytorch_tanh"),
            **_rope_keys(),
            "rms_norm_eps": Key(1e-6),
            "attention_bias": Key(False, BOOLS),
            "tie_word_embeddings": Key(True),
        },
        _gemma,
        packed=_LLAMA_PACKED,
    ),
    "Gemma2ForCausalLM": Family(
        "gemma2",
        {
            **SHAPE_KEYS,
            **_act("gelu_pytorch_tanh", "hidden_activation"),
            **_rope_keys(),
            **_GEMMA2_KEYS,
            "tie_word_embeddings": Key(True),
        },
        _gemma2,
        hf_to_ours=_SANDWICH_GEMMA,
        packed=_LLAMA_PACKED,
    ),
    "Gemma3ForCausalLM": Family(
        "gemma3_text",
        {
            **SHAPE_KEYS,
            **_act("gelu_pytorch_tanh", "hidden_activation"),
            **_rope_keys(1_000_000.0),
            **_GEMMA2_KEYS,
            "attn_logit_softcapping": Key(None),
            "final_logit_softcapping": Key(None),
            "use_bidirectional_attention": Key(False, (False, None)),
            "rope_local_base_freq": Key(10000.0),
            "tie_word_embeddings": Key(True),
        },
        _gemma3,
        hf_to_ours=_SANDWICH_GEMMA,
        packed=_LLAMA_PACKED,
    ),
    "Phi3ForCausalLM": Family(
        "phi3",
        {**SHAPE_KEYS, **_act(), **_rope_keys(partial=True), "rms_norm_eps": Key(1e-5), **_WINDOW_KEYS},
        _phi3,
    ),
    "PhiForCausalLM": Family(
        "phi",
        {
            **SHAPE_KEYS,
            **_act("gelu_new"),
            **_rope_keys(partial=True, partial_default=0.5),
            "layer_norm_eps": Key(1e-5),
            "qk_layernorm": Key(False, BOOLS),
        },
        _phi,
        hf_to_ours={
            ".self_attn.dense.": ".self_attn.o_proj.",
            ".mlp.fc1.": ".mlp.up_proj.",
            ".mlp.fc2.": ".mlp.down_proj.",
            "model.final_layernorm.": "model.norm.",
            ".q_layernorm.": ".q_norm.",
            ".k_layernorm.": ".k_norm.",
        },
        packed=_QKV_PACKED,
    ),
    "GPTNeoXForCausalLM": Family(
        "gpt_neox",
        {
            **_NEOX_SHAPE_KEYS,
            **_act("gelu"),
            **_rope_keys(partial=True, partial_default=0.25),
            "layer_norm_eps": Key(1e-5),
            "attention_bias": Key(True, BOOLS),
            "use_parallel_residual": Key(True, BOOLS),
        },
        _gpt_neox,
        hf_to_ours={
            "gpt_neox.embed_in.": "model.embed_tokens.",
            "gpt_neox.layers.": "model.layers.",
            "gpt_neox.final_layer_norm.": "model.norm.",
            "embed_out.": "lm_head.",
            ".attention.query_key_value.": ".self_attn.qkv_proj.",
            ".attention.dense.": ".self_attn.o_proj.",
            ".mlp.dense_h_to_4h.": ".mlp.up_proj.",
            ".mlp.dense_4h_to_h.": ".mlp.down_proj.",
        },
        packed={"qkv_proj": ("qkv_proj", "per_head")},
    ),  # rows [H, (q|k|v), D]
    "StableLmForCausalLM": Family(
        "stablelm",
        {
            **SHAPE_KEYS,
            **_act(),
            **_rope_keys(partial=True, partial_default=0.25),
            "layer_norm_eps": Key(1e-5),
            "qk_layernorm": Key(False, BOOLS),
            "use_parallel_residual": Key(False, BOOLS),
            "use_qkv_bias": Key(False, BOOLS),
        },
        _stablelm,
        hf_to_ours={".q_layernorm.": ".q_norm.", ".k_layernorm.": ".k_norm."},
        packed=_LLAMA_PACKED,
    ),
    "OlmoForCausalLM": Family(
        "olmo",
        {**SHAPE_KEYS, **_act(), **_rope_keys(), "attention_bias": Key(False, BOOLS), "clip_qkv": Key(None)},
        _olmo,
        packed=_LLAMA_PACKED,
    ),
    "Olmo2ForCausalLM": Family(
        "olmo2",
        {
            **SHAPE_KEYS,
            **_act(),
            **_rope_keys(),
            "rms_norm_eps": Key(1e-5),
            "attention_bias": Key(False, BOOLS),
        },
        _olmo2,
        hf_to_ours={
            ".post_attention_layernorm.": ".attn_out_norm.",
            ".post_feedforward_layernorm.": ".mlp_out_norm.",
        },
        packed=_LLAMA_PACKED,
    ),
    "Starcoder2ForCausalLM": Family(
        "starcoder2",
        {
            **SHAPE_KEYS,
            **_act("gelu_pytorch_tanh"),
            **_rope_keys(),
            "norm_epsilon": Key(1e-5),
            "use_bias": Key(True, BOOLS),
            **_WINDOW_KEYS,
            "tie_word_embeddings": Key(True),
        },
        _starcoder2,
        hf_to_ours={".mlp.c_fc.": ".mlp.up_proj.", ".mlp.c_proj.": ".mlp.down_proj."},
        packed=_QKV_PACKED,
    ),
    "GlmForCausalLM": Family(
        "glm",
        {
            **SHAPE_KEYS,
            **_act(),
            **_rope_keys(partial=True, partial_default=0.5),
            "rms_norm_eps": Key(1.5625e-07),
            "attention_bias": Key(True, BOOLS),
        },
        _glm,
        packed=_QKV_PACKED,
    ),
    "Glm4ForCausalLM": Family(
        "glm4",
        {
            **SHAPE_KEYS,
            **_act(),
            **_rope_keys(partial=True, partial_default=0.5),
            "rms_norm_eps": Key(1.5625e-07),
            "attention_bias": Key(True, BOOLS),
        },
        _glm4,
        hf_to_ours={
            ".post_self_attn_layernorm.": ".attn_out_norm.",
            ".post_mlp_layernorm.": ".mlp_out_norm.",
        },
        packed=_QKV_PACKED,
    ),
    "MixtralForCausalLM": Family(
        "mixtral",
        {
            **SHAPE_KEYS,
            **_act(),
            **_rope_keys(1_000_000.0),
            "rms_norm_eps": Key(1e-5),
            "sliding_window": Key(None),
            "num_local_experts": Key(8),
            **_MOE_KEYS,
        },
        _mixtral,
        hf_to_ours={".block_sparse_moe.": ".mlp."},
        packed=_LLAMA_PACKED,
    ),
    "Qwen2MoeForCausalLM": Family(
        "qwen2_moe",
        {
            **SHAPE_KEYS,
            **_act(),
            **_rope_keys(),
            "rms_norm_eps": Key(1e-6),
            **_QWEN_WINDOW_KEYS,
            "qkv_bias": Key(True, BOOLS),
            "num_experts": Key(60),
            "num_experts_per_tok": Key(4),
            "moe_intermediate_size": Key(1408),
            "shared_expert_intermediate_size": Key(5632),
            "norm_topk_prob": Key(False, BOOLS),
            "decoder_sparse_step": Key(1),
            "mlp_only_layers": Key([]),
        },
        _qwen2_moe,
        packed=_LLAMA_PACKED,
    ),
    "PhimoeForCausalLM": Family(
        "phimoe",
        {
            **SHAPE_KEYS,
            **_act(),
            **_rope_keys(1_000_000.0),
            "rms_norm_eps": Key(1e-5),
            "sliding_window": Key(None),
            "attention_bias": Key(False, BOOLS),
            "lm_head_bias": Key(False, BOOLS),
            "num_local_experts": Key(16),
            "num_experts_per_tok": Key(2, (2,), why="transformers' sparsemixer always picks two experts"),
            "router_jitter_noise": Key(0.01),
        },
        _phimoe,
        hf_to_ours={".block_sparse_moe.": ".mlp."},
        packed=_QKV_PACKED,
    ),
    "DbrxForCausalLM": Family(
        "dbrx",
        {
            "vocab_size": Key(32000),
            "d_model": Key(2048),
            "n_heads": Key(16),
            "n_layers": Key(24),
            "max_seq_len": Key(2048),
            "tie_word_embeddings": Key(False),
            "rope_theta": Key(10000.0),
            "rope_type": Key("default", ("default",), why="DBRX rotates with plain RoPE"),
            "attn_config.kv_n_heads": Key(1),
            "attn_config.clip_qkv": Key(None),
            "attn_config.rope_theta": Key(10000.0),
            "ffn_config.ffn_hidden_size": Key(3584),
            "ffn_config.moe_num_experts": Key(4),
            "ffn_config.moe_top_k": Key(1),
            "ffn_config.moe_normalize_expert_weights": Key(
                1.0, (1.0, None), why="the weights are divided by their p-norm: p = 1 or none"
            ),
            "ffn_config.ffn_act_fn": Key(
                {"name": "silu"}, ({"name": "silu"},), why="DBRX's experts use SiLU"
            ),
        },
        _dbrx,
        hf_to_ours={
            "transformer.wte.": "model.embed_tokens.",
            "transformer.blocks.": "model.layers.",
            "transformer.norm_f.": "model.norm.",
            ".norm_attn_norm.attn.Wqkv.": ".self_attn.qkv_proj.",
            ".norm_attn_norm.attn.out_proj.": ".self_attn.o_proj.",
            ".norm_attn_norm.norm_1.": ".input_layernorm.",
            ".norm_attn_norm.norm_2.": ".post_attention_layernorm.",
            ".ffn.router.layer.": ".mlp.gate.",
            ".ffn.experts.mlp.": ".mlp.experts.stacked_",
        },
    ),
    "DeepseekV2ForCausalLM": Family(
        "deepseek_v2",
        {
            **SHAPE_KEYS,
            **_act(),
            **_rope_keys(),
            **_DEEPSEEK_KEYS,
            "num_experts_per_tok": Key(None),
            "topk_method": Key("greedy", ("greedy", "group_limited_greedy")),
            "norm_topk_prob": Key(False, (False,), why="transformers' DeepseekV2 router never renormalises"),
            "scoring_func": Key("softmax", ("softmax",), why="DeepSeek-V2 scores experts by softmax"),
        },
        lambda r: _deepseek(r, v3=False),
        hf_to_ours=_DEEPSEEK_RENAMES,
        packed=_MLP_PACKED,
    ),
    "DeepseekV3ForCausalLM": Family(
        "deepseek_v3",
        {
            **SHAPE_KEYS,
            **_act(),
            **_rope_keys(),
            **{k: v for k, v in _DEEPSEEK_KEYS.items() if k != "mlp_bias"},  # V3's MLPs have no bias
            "n_routed_experts": Key(256),
            "n_shared_experts": Key(1),
            "moe_intermediate_size": Key(2048),
            "first_k_dense_replace": Key(3),
            "routed_scaling_factor": Key(2.5),
            "n_group": Key(8),
            "topk_group": Key(4),
            "num_experts_per_tok": Key(8),
            "norm_topk_prob": Key(True, BOOLS),
            "rope_interleave": Key(True, BOOLS),
            "num_nextn_predict_layers": Key(1),
            "topk_method": Key("noaux_tc", ("noaux_tc",), why="transformers' DeepseekV3 routes by noaux_tc"),
            "scoring_func": Key("sigmoid", ("sigmoid",), why="DeepSeek-V3 scores experts by sigmoid"),
        },
        lambda r: _deepseek(r, v3=True),
        hf_to_ours=_DEEPSEEK_RENAMES,
        packed=_MLP_PACKED,
    ),
    "MiniCPM3ForCausalLM": Family(
        "minicpm3",
        {
            **SHAPE_KEYS,
            **_act(),
            **_rope_keys(),
            **_MLA_KEYS,
            "kv_lora_rank": Key(256),
            "q_lora_rank": Key(768),
            "qk_nope_head_dim": Key(64),
            "qk_rope_head_dim": Key(32),
            "v_head_dim": Key(64),
            "rms_norm_eps": Key(1e-5),
            "mlp_bias": Key(False, BOOLS),
            "scale_emb": Key(12),
            "scale_depth": Key(1.4),
            "dim_model_base": Key(256),
        },
        _minicpm3,
        packed=_MLP_PACKED,
    ),
    "CohereForCausalLM": Family(
        "cohere",
        {
            **SHAPE_KEYS,
            **_act(),
            **_rope_keys(500000.0),
            "layer_norm_eps": Key(1e-5),
            "attention_bias": Key(False, BOOLS),
            "logit_scale": Key(0.0625),
            "use_qk_norm": Key(False, BOOLS),
            "tie_word_embeddings": Key(True),
        },
        _cohere,
        packed=_LLAMA_PACKED,
    ),
}


def architecture_of(hf: dict[str, Any]) -> str:
    """`architectures[0]`; without it (a config built in code), the family of `model_type`, as
    transformers' AutoModelForCausalLM would pick it."""
    archs = hf.get("architectures") or []
    if archs:
        return archs[0]
    by_type = [arch for arch, family in FAMILIES.items() if family.model_type == hf.get("model_type")]
    return by_type[0] if by_type else ""


def parse_family(architecture: str, hf: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig fields of `architecture` from the HF config dict (validated by its table)."""
    family = FAMILIES.get(architecture)
    if family is None:
        raise ValueError(
            f"unsupported model architecture {architecture!r}; supported: {', '.join(sorted(FAMILIES))}"
        )
    return family.build(Reader(architecture, family, hf))


def rename_pattern(family: Family) -> re.Pattern[str] | None:
    """One regex over every `hf_to_ours` key, so each checkpoint name is renamed in a single pass."""
    if not family.hf_to_ours:
        return None
    return re.compile("|".join(re.escape(k) for k in sorted(family.hf_to_ours, key=len, reverse=True)))


def hf_to_ours(family: Family, name: str) -> str:
    pattern = rename_pattern(family)
    return name if pattern is None else pattern.sub(lambda m: family.hf_to_ours[m.group(0)], name)


def ours_to_hf(family: Family, name: str) -> str:
    inverse = {v: k for k, v in family.hf_to_ours.items()}
    if not inverse:
        return name
    pattern = re.compile("|".join(re.escape(k) for k in sorted(inverse, key=len, reverse=True)))
    return pattern.sub(lambda m: inverse[m.group(0)], name)
