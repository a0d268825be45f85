"""Config parsing (transformers 4 and 5 layouts), RoPE scaling vs HF, loader (sharded, fused), tiny.py."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from lmforge.kernels.rope_cache import compute_inv_freq
from lmforge.runtime.engine.attention import get_attention_backend
from lmforge.runtime.models.config import ModelConfig, load_model_config
from lmforge.runtime.models.loader import load_weights
from lmforge.runtime.models.registry import get_model_class
from lmforge.runtime.models.tiny import ARCHS, save_tiny_model

BASE = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


def test_config_v4_layout():
    cfg = ModelConfig.from_hf(
        {
            **BASE,
            "architectures": ["LlamaForCausalLM"],
            "num_key_value_heads": 2,
            "rope_theta": 500000.0,
            "torch_dtype": "bfloat16",
            "eos_token_id": [1, 9],
            "rope_scaling": {
                "type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        }
    )
    assert (cfg.head_dim, cfg.num_kv_heads, cfg.rope_theta, cfg.torch_dtype) == (16, 2, 500000.0, "bfloat16")
    assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.eos_token_ids == [1, 9]
    assert not cfg.qkv_bias and not cfg.tie_word_embeddings


def test_config_v5_layout_and_qwen2_bias():
    cfg = ModelConfig.from_hf(
        {
            **BASE,
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_window": 4096,
            "use_sliding_window": False,
            "dtype": "float32",
        }
    )
    assert cfg.rope_theta == 1e6 and cfg.rope_scaling is None and cfg.num_kv_heads == 4
    assert cfg.qkv_bias and not cfg.o_bias and cfg.sliding_window is None


@pytest.mark.parametrize("arch", ["llama31"])
def test_llama3_rope_frequencies_match_transformers(arch):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from lmforge.runtime.models.tiny import tiny_hf_config

    hf = tiny_hf_config(arch, 100)
    assert isinstance(hf, LlamaConfig)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    ours = ModelConfig.from_hf(hf.to_dict())
    base = compute_inv_freq(16, ours.rope_theta)
    got = compute_inv_freq(16, ours.rope_theta, ours.rope_scaling)
    assert torch.allclose(got, expected, rtol=1e-6, atol=0)
    assert not torch.allclose(got, base)  # the scaling did something


def test_unknown_architecture_names_the_supported_ones():
    with pytest.raises(
        ValueError,
        match=r"'JambaForCausalLM'; supported: .*LlamaForCausalLM, MiniCPM3ForCausalLM, MistralForCausalLM",
    ):
        get_model_class("JambaForCausalLM")


def test_unsupported_rope_scaling():
    with pytest.raises(ValueError, match="rope_type 'mrope' is not supported"):
        compute_inv_freq(4, 10000.0, {"rope_type": "mrope", "factor": 2.0})


def test_loader_fuses_qkv_and_reads_sharded_checkpoints(tmp_path):
    from safetensors.torch import load_file, save_file

    path = save_tiny_model(tmp_path / "m", "qwen2")
    tensors = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, path / shard)
        weight_map.update(dict.fromkeys(keys, shard))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    cfg = load_model_config(path)
    model = get_model_class(cfg.architecture)(cfg, 64, get_attention_backend())
    load_weights(model, path)
    attn = model.model.layers[1].self_attn
    q, k, v = (tensors[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv")
    assert torch.equal(attn.qkv_proj.weight, torch.cat([q, k, v]))
    assert torch.equal(
        attn.qkv_proj.bias, torch.cat([tensors[f"model.layers.1.self_attn.{p}_proj.bias"] for p in "qkv"])
    )
    up = tensors["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(model.model.layers[0].mlp.gate_up_proj.weight[up.shape[0] :], up)


def test_loader_reports_missing_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    path = save_tiny_model(tmp_path / "m", "llama")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, path / "model.safetensors")
    cfg = load_model_config(path)
    model = get_model_class(cfg.architecture)(cfg, 64, get_attention_backend())
    with pytest.raises(ValueError, match="lacks weights for: model.norm.weight"):
        load_weights(model, path)


def test_tiny_models_are_deterministic_and_complete(tmp_path):
    from transformers import AutoTokenizer

    digests = []
    for name in ("a", "b"):
        path = save_tiny_model(tmp_path / name, "llama32", seed=3)
        digests.append(hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    other = save_tiny_model(tmp_path / "c", "llama32", seed=4)
    assert hashlib.sha256((other / "model.safetensors").read_bytes()).hexdigest() != digests[0]
    cfg = load_model_config(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert cfg.vocab_size == len(tok) >= 256 and cfg.tie_word_embeddings
    assert (tok.bos_token_id, tok.eos_token_id, cfg.eos_token_ids) == (0, 1, [1])
    assert tok.chat_template and tok.encode("hi")[0] == tok.bos_token_id


@pytest.mark.parametrize("arch", ARCHS)
def test_every_tiny_arch_loads(tmp_path, arch):
    path = save_tiny_model(tmp_path / arch, arch, hidden_size=32, num_heads=2, num_kv_heads=1)
    cfg = load_model_config(path)
    model = get_model_class(cfg.architecture)(cfg, 32, get_attention_backend())
    load_weights(model, path)
    assert (model.lm_head is None) == cfg.tie_word_embeddings
