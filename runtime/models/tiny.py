"""Tiny random-init HF checkpoints for tests, demos and benchmarks (no hub downloads).

`save_tiny_model(path, arch)` writes config.json, model.safetensors, generation_config.json and
a real tokenizer (byte-level BPE trained in-process on the text below, chat template included)
whose vocabulary matches the model's. Seeded and deterministic; well under a second for the
default shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# tiny arch name -> (transformers model_type, config kwargs beyond the shared shape). Each is a real
# configuration of its family (the keys its users' checkpoints set), with windows (20-24 tokens, shorter
# than the parity prompts), soft-caps and RoPE choices that make the family's own math matter.
_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
TINY_SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
    "llama31": ("llama", {"rope_parameters": _LLAMA3_ROPE}),
    "llama32": ("llama", {"rope_parameters": _LLAMA3_ROPE, "tie_word_embeddings": True}),
    # a Llama-architecture checkpoint with another activation and biases everywhere
    "llama_gelu": (
        "llama",
        {
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "hidden_act": "gelu_pytorch_tanh",
            "attention_bias": True,
            "mlp_bias": True,
        },
    ),
    "mistral": (
        "mistral",
        {"rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "sliding_window": None},
    ),
    "mistral_window": (
        "mistral",
        {"rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "sliding_window": 24},
    ),  # Mistral v0.1: every layer slides
    "qwen2": ("qwen2", {"rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}),
    # Qwen2.5 long context: yarn
    "qwen2_yarn": (
        "qwen2",
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 1000000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 32,
            }
        },
    ),
    "qwen2_window": (
        "qwen2",
        {
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
            "use_sliding_window": True,
            "sliding_window": 20,
            "max_window_layers": 1,
        },
    ),
    "qwen3": (
        "qwen3",
        {"rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "head_dim": 24},
    ),
    "gemma": ("gemma", {"head_dim": 16, "hidden_act": "gelu_pytorch_tanh"}),
    "gemma2": (
        "gemma2",
        {
            "head_dim": 16,
            "query_pre_attn_scalar": 24,
            "attn_logit_softcapping": 3.0,
            "final_logit_softcapping": 4.0,
            "sliding_window": 24,
        },
    ),
    "gemma3": (
        "gemma3_text",
        {
            "head_dim": 16,
            "query_pre_attn_scalar": 24,
            "sliding_window": 24,
            "layer_types": ["sliding_attention", "full_attention"],
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0},
            },
        },
    ),
    "phi3": (
        "phi3",
        {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "sliding_window": None},
    ),
    # Phi-3-mini-128k / Phi-3.5-mini: longrope, short factors up to original_max_position_embeddings, long beyond
    "phi3_longrope": (
        "phi3",
        {
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "short_factor": [1.0 + 0.05 * i for i in range(8)],
                "long_factor": [1.0 + 0.6 * i for i in range(8)],
                "original_max_position_embeddings": 32,
            },
            "original_max_position_embeddings": 32,  # Phi3Config copies it into the rope dict
            "sliding_window": None,
        },
    ),
    # Phi-4-mini: Phi3ForCausalLM with partial rotary and tied embeddings
    "phi3_partial": (
        "phi3",
        {
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75},
            "tie_word_embeddings": True,
        },
    ),
    "phi": (
        "phi",
        {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
    ),
    "gpt_neox": (
        "gpt_neox",
        {
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
            "use_parallel_residual": True,
        },
    ),
    "stablelm": (
        "stablelm",
        {
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
            "use_qkv_bias": True,
        },
    ),
    "stablelm_qknorm": (
        "stablelm",
        {
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
            "qk_layernorm": True,
            "use_parallel_residual": True,
        },
    ),
    "olmo": ("olmo", {"clip_qkv": 1.5}),
    "olmo2": ("olmo2", {}),
    "starcoder2": ("starcoder2", {"sliding_window": 24, "use_bias": True}),
    "glm": ("glm", {"head_dim": 16}),
    "glm4": ("glm4", {"head_dim": 16}),
    "cohere": ("cohere", {"use_qk_norm": True, "logit_scale": 0.5}),
    # --- mixture of experts (>= 4 experts, top-2 or more) and latent attention ---
    "mixtral": (
        "mixtral",
        {
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
        },
    ),
    # Phi-3.5-MoE: sparsemixer top-2 (a wide jitter so that the softmax of each pick spans several experts)
    "phimoe": (
        "phimoe",
        {
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "router_jitter_noise": 0.3,
            "attention_bias": True,
            "lm_head_bias": True,
        },
    ),
    # Phi-3.5-MoE as released: longrope with one short_mscale = long_mscale
    "phimoe_longrope": (
        "phimoe",
        {
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "short_factor": [1.0 + 0.05 * i for i in range(8)],
                "long_factor": [1.0 + 0.6 * i for i in range(8)],
                "short_mscale": 1.25,
                "long_mscale": 1.25,
                "original_max_position_embeddings": 32,
            },
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "router_jitter_noise": 0.3,
        },
    ),
    # Qwen1.5-MoE: softmax top-k without renormalisation, a sigmoid-gated shared expert
    "qwen2_moe": (
        "qwen2_moe",
        {
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
            "num_experts": 6,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 48,
            "shared_expert_intermediate_size": 80,
        },
    ),
    # DeepSeek-V2-Lite-like: q_proj without LoRA, group-limited greedy routing, a dense first layer,
    # a shared expert, routed scaling, yarn with mscale_all_dim (the softmax scale changes too)
    "deepseek_v2": (
        "deepseek_v2",
        {
            "kv_lora_rank": 32,
            "q_lora_rank": None,
            "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8,
            "head_dim": 8,
            "v_head_dim": 12,
            "n_routed_experts": 6,
            "n_shared_experts": 1,
            "moe_intermediate_size": 40,
            "num_experts_per_tok": 2,
            "topk_method": "group_limited_greedy",  # top-2 within the best of 2 groups of 3
            "n_group": 2,
            "topk_group": 1,
            "first_k_dense_replace": 1,
            "routed_scaling_factor": 1.5,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 256,  # x 4 = the tiny max_position_embeddings
                "beta_fast": 32,
                "beta_slow": 1,
                "mscale": 0.707,
                "mscale_all_dim": 0.707,
            },
        },
    ),
    # DeepSeek-V3: sigmoid scores, noaux_tc (correction bias, top-2-sum groups), renormalised, scaled
    "deepseek_v3": (
        "deepseek_v3",
        {
            "kv_lora_rank": 32,
            "q_lora_rank": 24,
            "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8,
            "head_dim": 8,
            "v_head_dim": 12,
            "n_routed_experts": 8,
            "n_shared_experts": 1,
            "moe_intermediate_size": 40,
            "num_experts_per_tok": 3,
            "n_group": 4,
            "topk_group": 2,
            "first_k_dense_replace": 1,
            "routed_scaling_factor": 2.5,
            "norm_topk_prob": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        },
    ),
    "dbrx": ("dbrx", {"ffn_experts": 4, "ffn_top_k": 2, "clip_qkv": 1.5, "rope_theta": 500000.0}),
    "minicpm3": (
        "minicpm3",
        {
            "kv_lora_rank": 32,
            "q_lora_rank": 24,
            "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8,
            "head_dim": 8,
            "v_head_dim": 12,
            "scale_emb": 12,
            "scale_depth": 1.4,
            "dim_model_base": 16,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        },
    ),
}
ARCHS = tuple(TINY_SPECS)
_MLA_TYPES = ("deepseek_v2", "deepseek_v3", "minicpm3")

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]  # ids 0, 1, 2: bos, eos, pad

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A paged KV cache stores keys and values in blocks.
Continuous batching mixes prefill chunks with decode steps so that the GPU never idles.
Hello world! How are you today? I am fine, thank you. What is the capital of France? Paris.
Kubernetes operators reconcile the desired state with the actual state of the cluster.
Large language models predict the next token given all the previous tokens in the sequence.
def main():\n    print("hello, world")\n    return 0\n
for i in range(10):\n    total += i * i\n
<|system|> You are a helpful assistant. <|user|> Tell me a joke. <|assistant|> Why did the chicken cross the road?
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2.71828 42.
Ünïcödé: café naïve résumé façade. 日本語のテキスト。中文文本。한국어 텍스트. Emoji: 🙂 🚀 🎉 👍🏽 ❤️.
The attention mechanism computes softmax(QK^T / sqrt(d)) V for every head in parallel.
Rotary position embeddings rotate pairs of dimensions by an angle proportional to the position.
"""


def build_tokenizer(vocab_size: int = 384):
    """Byte-level BPE trained on `_CORPUS`; every byte is a token, so any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
    )


def tiny_hf_config(
    arch: str,
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 1024,
    initializer_range: float = 0.02,
):
    from transformers import AutoConfig

    if arch not in TINY_SPECS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose one of {ARCHS}")
    model_type, extra = TINY_SPECS[arch]
    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    eps = (
        {"rms_norm_eps": 1e-5}
        if model_type not in ("phi", "gpt_neox", "stablelm", "cohere", "olmo", "starcoder2")
        else {}
    )
    if model_type == "gpt_neox":
        common.pop("num_key_value_heads")  # multi-head only
    if model_type == "dbrx":  # nested attention / FFN configs
        return AutoConfig.for_model("dbrx", **_dbrx_kwargs(common, extra))
    if model_type in _MLA_TYPES:
        common["num_key_value_heads"] = num_heads  # the latent expands to every head
    return AutoConfig.for_model(model_type, **{**common, **eps, **extra})  # the spec's own shapes win


def _dbrx_kwargs(common: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    theta = extra["rope_theta"]
    return dict(
        vocab_size=common["vocab_size"],
        d_model=common["hidden_size"],
        n_heads=common["num_attention_heads"],
        n_layers=common["num_hidden_layers"],
        max_seq_len=common["max_position_embeddings"],
        initializer_range=common["initializer_range"],
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        attn_config={
            "kv_n_heads": common["num_key_value_heads"],
            "clip_qkv": extra["clip_qkv"],
            "rope_theta": theta,
        },
        ffn_config={
            "ffn_hidden_size": common["intermediate_size"],
            "moe_num_experts": extra["ffn_experts"],
            "moe_top_k": extra["ffn_top_k"],
        },
    )


def widen_weights(model, seed: int, *, bias_std: float = 0.2, norm_std: float = 0.3) -> None:
    """Parity tests need weights that make every op matter (HF's std 0.02 leaves the logits nearly flat,
    so a wrong RoPE or activation can still pick the same greedy tokens): matrices ~ N(0, 1/fan_in),
    biases ~ N(0, bias_std^2), norm weights ~ their init + N(0, norm_std^2) (so Gemma's (1 + w) and a
    plain w differ), deterministic in `seed`."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=g)
            if param.dim() >= 2:
                param.copy_(noise / param.shape[-1] ** 0.5)
            elif "norm" in name:
                param.add_(noise * norm_std)
            else:
                param.copy_(noise * bias_std)


def save_tiny_model(
    path: str | Path,
    arch: str = "llama",
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    vocab_size: int = 384,
    max_position_embeddings: int = 1024,
    seed: int = 0,
    initializer_range: float = 0.02,
    dtype: str = "float32",
    widen: bool = False,
    config_overrides: dict[str, Any] | None = None,
) -> Path:
    """Writes a random-init `arch` checkpoint + tokenizer to `path`; returns the path.

    arch: a key of TINY_SPECS ("llama" Llama 2/3, "llama31" llama3 rope scaling, "llama32" tied
    embeddings + llama3 rope, "mistral", "qwen2", "qwen3", "gemma2", "phi", ...). `vocab_size` is the
    BPE target; the model's vocabulary is the tokenizer's actual size. widen: `widen_weights` (parity
    tests). config_overrides: HF config attributes set after the spec's (negative controls, variants).
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    tokenizer = build_tokenizer(vocab_size)
    config = tiny_hf_config(
        arch,
        len(tokenizer),
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
    )
    for key, value in (config_overrides or {}).items():
        setattr(config, key, value)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32 if widen else getattr(torch, dtype)
        )
        if widen:  # drawn in fp32, then cast: the same weights whatever the checkpoint dtype
            widen_weights(model, seed)
            model = model.to(getattr(torch, dtype))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
