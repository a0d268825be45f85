"""ModelConfig: the few numbers a Llama-family forward needs, read from an HF `config.json`.

Accepts both the transformers<5 layout (`rope_theta` + `rope_scaling`) and the transformers>=5
layout (`rope_parameters`). Nothing here imports torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(slots=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3"|"linear", ...}; None: plain RoPE
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: q/k/v projections carry a bias
    o_bias: bool = False  # Llama with attention_bias=True: o_proj too
    sliding_window: int | None = None
    torch_dtype: str | None = None  # the checkpoint's dtype ("bfloat16", ...)
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    # --- older families (gpt2.py, opt.py, bloom.py, mpt.py, falcon.py) ---
    family: Any = None  # the family's own frozen options dataclass (what only its graph reads)
    # Set by the engine, not read from config.json:
    model: str = ""  # the checkpoint directory served
    max_model_len: int = 0  # the served context limit (prompt + generated tokens)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        archs = hf.get("architectures") or []
        from lmforge.runtime.models.registry import FAMILY_CONFIG_PARSERS

        if archs and archs[0] in FAMILY_CONFIG_PARSERS:
            return FAMILY_CONFIG_PARSERS[archs[0]](hf)
        if hf.get("mlp_bias"):
            raise ValueError("mlp_bias=True checkpoints are not supported")
        num_heads = hf["num_attention_heads"]
        rope = dict(hf.get("rope_parameters") or {})
        rope_theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        scaling = rope or dict(hf.get("rope_scaling") or {})
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        scaling = None if rope_type == "default" else {**scaling, "rope_type": rope_type}
        sliding = hf.get("sliding_window")
        if hf.get("model_type") == "qwen2" and not hf.get("use_sliding_window", False):
            sliding = None
        return cls(
            architecture=archs[0] if archs else "",
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=bool(hf.get("attention_bias", False)) or hf.get("model_type") == "qwen2",
            o_bias=bool(hf.get("attention_bias", False)),
            sliding_window=sliding,
            torch_dtype=hf.get("dtype") or hf.get("torch_dtype"),
            eos_token_ids=_as_list(hf.get("eos_token_id")),
            bos_token_id=hf.get("bos_token_id"),
        )


def _as_list(x: int | list[int] | None) -> list[int]:
    if x is None:
        return []
    return list(x) if isinstance(x, list | tuple) else [int(x)]


def load_model_config(model_dir: str | Path) -> ModelConfig:
    """Reads config.json (+ generation_config.json's eos ids, which Llama 3 lists there)."""
    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}: expected a Hugging Face checkpoint directory")
    config = ModelConfig.from_hf(json.loads(path.read_text()))
    gen_path = model_dir / "generation_config.json"
    if gen_path.is_file():
        gen_eos = _as_list(json.loads(gen_path.read_text()).get("eos_token_id"))
        config.eos_token_ids = list(dict.fromkeys(config.eos_token_ids + gen_eos))
    return config
