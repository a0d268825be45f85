"""ModelConfig: every number and switch a decoder forward needs, read from an HF `config.json`.

The per-family reading lives in `families.py` (one table: which keys each architecture reads and
which values it accepts). `load_model_config` first lets transformers' own config class fill in its
defaults and old key names (`rotary_pct`, `rope_local_base_freq`, top-level `rope_theta`, ...), so
that a key missing from config.json means what it means to transformers. `ModelConfig.from_hf` is
pure (no torch, no transformers) and accepts both the transformers<5 layout (`rope_theta` +
`rope_scaling`) and the transformers>=5 layout (`rope_parameters`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NORMS = ("rms", "rms_1p", "layer", "layer_no_bias", "layer_no_affine")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
LAYOUTS = ("pre", "parallel", "parallel_2norm", "sandwich", "post")
QK_NORMS = ("head", "full", "head_layer", "head_layer_per_head", "head_layer_modules")
# Architectures with their own graph and config parser (the module's `config_from_hf`), not the family table.
LEGACY_FAMILY_MODULES = {
    "GPT2LMHeadModel": "gpt2",
    "OPTForCausalLM": "opt",
    "BloomForCausalLM": "bloom",
    "MptForCausalLM": "mpt",
    "FalconForCausalLM": "falcon",
}


@dataclass(frozen=True, slots=True)
class MoEConfig:
    """A sparse mixture-of-experts MLP (runtime/models/moe.py), as each family's router computes it.

    scoring: "softmax" (Mixtral, Qwen2-MoE, DeepSeek-V2) or "sigmoid" (DeepSeek-V3) over the router logits;
    the top_k experts are chosen by score (+ `score_correction_bias`, V3's noaux_tc), optionally first
    restricted to the best `topk_groups` of `num_groups` expert groups (a group scores by its best expert,
    "max", V2; or its two best summed, "top2_sum", V3; masked experts score `group_fill`). The chosen
    scores are the weights: renormalised to sum 1 (+ renorm_eps) when `renormalize`, times
    `routed_scaling`. `layers[i]`: layer i is sparse (the others keep the dense MLP).
    """

    num_experts: int
    top_k: int
    intermediate_size: int
    layers: tuple[bool, ...]
    scoring: str = "softmax"  # or "sigmoid"; "sparsemixer": Phi-3.5-MoE's top-2 (moe.route)
    jitter_eps: float = 0.0  # sparsemixer: experts within 2 * eps (relative) of the best share its softmax
    renormalize: bool = True
    renorm_eps: float = 0.0
    routed_scaling: float = 1.0
    num_groups: int | None = None
    topk_groups: int | None = None
    group_score: str = "max"
    group_fill: float = 0.0
    score_correction_bias: bool = False
    router_fp32: bool = False  # DeepSeek: logits from fp32 hidden states and an fp32 gate weight
    weights_in_logits_dtype: bool = False  # Qwen2-MoE rounds the weights to the logits' dtype
    shared_intermediate_size: int = 0  # 0: no shared expert
    shared_gate: bool = False  # Qwen2-MoE: the shared expert's output times sigmoid(gate(x))
    # tensor parallelism (parallel.local_config): this rank holds experts [expert_start, expert_start +
    # local_experts) of the num_experts the router scores; 0: all of them (one rank)
    expert_start: int = 0
    local_experts: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"MoE top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
        if self.scoring not in ("softmax", "sigmoid", "sparsemixer"):
            raise ValueError(f"MoE scoring {self.scoring!r}: expected 'softmax', 'sigmoid' or 'sparsemixer'")
        if self.scoring == "sparsemixer" and self.top_k != 2:
            raise ValueError(f"MoE sparsemixer routing picks 2 experts, not top_k={self.top_k}")
        if self.num_groups is not None:
            if self.num_experts % self.num_groups or not 0 < (self.topk_groups or 0) <= self.num_groups:
                raise ValueError(
                    f"MoE groups: {self.num_experts} experts in n_group={self.num_groups} groups, "
                    f"topk_group={self.topk_groups}: the groups must divide the experts and 1 <= topk_group <= n_group"
                )


@dataclass(frozen=True, slots=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3, MiniCPM3; runtime/models/mla.py): the KV cache holds
    one vector per token, the normalised latent (kv_lora_rank) and the shared rotated key (rope_head_dim)."""

    kv_lora_rank: int
    q_lora_rank: int | None  # None: one q_proj
    nope_head_dim: int
    rope_head_dim: int
    v_head_dim: int
    attention_bias: bool = False  # q_a_proj, kv_a_proj_with_mqa, o_proj

    @property
    def latent_dim(self) -> int:
        return self.kv_lora_rank + self.rope_head_dim


@dataclass(slots=True)
class ModelConfig:
    """Decoder shape and switches. Defaults are Llama's, so a Llama config only sets shapes.

    norm:   "rms" (Llama), "rms_1p" (Gemma: x * (1 + w)), "layer" (LayerNorm with bias),
            "layer_no_bias" (Cohere), "layer_no_affine" (OLMo: no weight, no bias)
    layout: "pre" x + attn(n1(x)); h + mlp(n2(h))                           Llama
            "parallel" x + attn(n1(x)) + mlp(n1(x))                          Phi, Cohere, GPT-J
            "parallel_2norm" x + attn(n1(x)) + mlp(n2(x))                    GPT-NeoX, StableLM-parallel
            "sandwich" x + na(attn(n1(x))); h + nm(mlp(n2(h)))              Gemma2/3, GLM-4
            "post" x + na(attn(x)); h + nm(mlp(h))                           OLMo2
    qk_norm: "head" (RMS over head_dim, weight [D]: Qwen3, Gemma3), "full" (RMS over all heads,
            weight [H*D]: OLMo2), "head_layer" (LayerNorm over D, weight+bias [D]: Phi),
            "head_layer_per_head" (LayerNorm over D, one weight [H, D]: Cohere), "head_layer_modules"
            (the same math as one bias-free LayerNorm module per head: StableLM's `norms.<h>.weight`)
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6  # the eps of every norm (RMS or Layer)
    norm: str = "rms"
    hidden_act: str = "silu"  # canonical name (ACTIVATIONS)
    gated_mlp: bool = True  # act(gate(x)) * up(x) vs act(up(x))
    layout: str = "pre"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3"|"linear", ...}; None: plain RoPE
    rotary_dim: int | None = None  # partial rotary: the first rotary_dim dims of each head rotate; None: all
    rope_is_neox_style: bool = True  # False: GPT-J / GLM interleaved pairs
    # Gemma3: the layers typed "sliding_attention" (local_rope_layers[i]) have their own RoPE (theta,
    # scaling), whatever their window; None: one RoPE for every layer
    local_rope_theta: float | None = None
    local_rope_scaling: dict[str, Any] | None = None
    local_rope_layers: tuple[bool, ...] = ()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: q/k/v projections carry a bias
    o_bias: bool = False  # Llama with attention_bias=True: o_proj too
    mlp_bias: bool = False
    lm_head_bias: bool = False  # Phi
    qk_norm: str | None = None
    clip_qkv: float | None = None  # OLMo: q, k, v clamped to [-clip, clip]
    embedding_multiplier: float | None = None  # Gemma: sqrt(hidden_size), in the activation dtype
    attn_scale: float | None = None  # softmax scale; None: head_dim ** -0.5
    attn_logit_softcap: float | None = None  # Gemma2: cap * tanh(scores / cap)
    final_logit_softcap: float | None = None  # Gemma2: on the logits
    logit_scale: float | None = None  # Cohere: logits * scale
    layer_sliding_windows: tuple[int | None, ...] = ()  # per layer; () or None entries: full attention
    moe: MoEConfig | None = None  # sparse MLP layers (Mixtral, Qwen2-MoE, DeepSeek, ...)
    mla: MLAConfig | None = None  # latent attention instead of q/k/v heads (DeepSeek-V2/V3, MiniCPM3)
    skipped_layers: tuple[int, ...] = ()  # checkpoint layers no forward runs (DeepSeek-V3's MTP layers)
    residual_multiplier: float | None = None  # MiniCPM3: each sublayer's output times scale_depth / sqrt(L)
    logits_divisor: float | None = None  # MiniCPM3: hidden / (hidden_size / dim_model_base) before lm_head
    torch_dtype: str | None = None  # the checkpoint's dtype ("bfloat16", ...)
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    # --- older families with their own graph files (gpt2.py, opt.py, bloom.py, mpt.py, falcon.py) ---
    family: Any = None  # that family's frozen options dataclass: what only its graph reads
    # Set by the engine, not read from config.json:
    model: str = ""  # the checkpoint directory served
    max_model_len: int = 0  # the served context limit (prompt + generated tokens)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        for name, value, allowed in (
            ("norm", self.norm, NORMS),
            ("hidden_act", self.hidden_act, ACTIVATIONS),
            ("layout", self.layout, LAYOUTS),
            ("qk_norm", self.qk_norm, (None, *QK_NORMS)),
        ):
            if value not in allowed:
                raise ValueError(f"ModelConfig.{name}={value!r}: expected one of {allowed}")
        if self.layer_sliding_windows and len(self.layer_sliding_windows) != self.num_layers:
            raise ValueError(
                f"layer_sliding_windows has {len(self.layer_sliding_windows)} entries for "
                f"{self.num_layers} layers"
            )

    @property
    def sliding_window(self) -> int | None:
        """The smallest window of any layer (None: every layer attends to the full context)."""
        windows = [w for w in self.layer_sliding_windows if w]
        return min(windows) if windows else None

    def layer_window(self, layer_idx: int) -> int | None:
        return self.layer_sliding_windows[layer_idx] if self.layer_sliding_windows else None

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Parses an HF config dict by its `architectures[0]` (see families.FAMILIES); refuses, by
        architecture, key and value, anything the engine does not implement."""
        from lmforge.runtime.models.families import FAMILIES, architecture_of, parse_family

        architecture = architecture_of(hf)
        if architecture not in FAMILIES and architecture not in LEGACY_FAMILY_MODULES:
            supported = ", ".join(sorted([*FAMILIES, *LEGACY_FAMILY_MODULES]))
            raise ValueError(f"unsupported model architecture {architecture!r}; supported: {supported}")
        if architecture in LEGACY_FAMILY_MODULES:  # their own parser, in their model file
            import importlib

            module = importlib.import_module(f"lmforge.runtime.models.{LEGACY_FAMILY_MODULES[architecture]}")
            return module.config_from_hf(hf)
        fields = parse_family(architecture, hf)
        return cls(
            architecture=architecture,
            torch_dtype=hf.get("dtype") or hf.get("torch_dtype"),
            eos_token_ids=_as_list(hf.get("eos_token_id")),
            bos_token_id=hf.get("bos_token_id"),
            **fields,
        )


def _as_list(x: int | list[int] | None) -> list[int]:
    if x is None:
        return []
    return list(x) if isinstance(x, list | tuple) else [int(x)]


def normalize_with_transformers(hf: dict[str, Any]) -> dict[str, Any]:
    """config.json through transformers' own config class (`model_type`): its defaults for absent keys,
    its renames of old keys, its derived `layer_types`. Unknown model types are left as they are (the
    family table then refuses the architecture by name)."""
    from transformers import CONFIG_MAPPING

    model_type = hf.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        return hf
    try:
        normalized = CONFIG_MAPPING[model_type].from_dict(dict(hf)).to_dict()
    except (TypeError, ValueError, KeyError) as e:
        archs = hf.get("architectures") or [model_type]
        raise ValueError(f"{archs[0]}: transformers rejects this config.json: {e}") from e
    return {**normalized, "architectures": hf.get("architectures") or normalized.get("architectures")}


def load_model_config(model_dir: str | Path) -> ModelConfig:
    """Reads config.json (+ generation_config.json's eos ids, which Llama 3 lists there)."""
    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no config.json in {model_dir}: expected a Hugging Face checkpoint directory"
        )
    config = ModelConfig.from_hf(normalize_with_transformers(json.loads(path.read_text())))
    gen_path = model_dir / "generation_config.json"
    if gen_path.is_file():
        gen_eos = _as_list(json.loads(gen_path.read_text()).get("eos_token_id"))
        config.eos_token_ids = list(dict.fromkeys(config.eos_token_ids + gen_eos))
    return config
