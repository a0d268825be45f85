"""The MoE and MLA building blocks beyond HF parity (tests/runtime/test_llm_parity.py): the latent cache
holds one vector per token and the engine sizes blocks by it; refusals name the key or option; the
per-expert checkpoint tensors land in their slices of the stacked expert parameters."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lmforge import LLM
from lmforge.runtime.models.config import ModelConfig, MoEConfig, load_model_config
from lmforge.runtime.models.moe import expert_target, route
from lmforge.runtime.models.tiny import save_tiny_model, tiny_hf_config


@pytest.fixture(scope="module")
def deepseek_v2(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("mla") / "m", "deepseek_v2", widen=True)


def test_the_latent_cache_holds_one_vector_per_token_and_sizes_the_blocks(deepseek_v2):
    llm = LLM(deepseek_v2, device="cpu", dtype="float32", max_model_len=64, num_blocks=8, block_size=16)
    runner, cfg = llm.llm_engine.runner, llm.llm_engine.runner.config
    mla = cfg.mla
    assert mla is not None and (mla.kv_lora_rank, mla.rope_head_dim) == (32, 8)
    for attn in runner.model.attention_layers():
        assert tuple(attn.kv_cache.shape) == (8, 16, 32 + 8)  # no head axis, no separate V
    assert runner.block_bytes == 16 * cfg.num_layers * (32 + 8) * 4
    # a per-head cache of the expanded keys (nope + rope) and values would take H x (16 + 8 + 12) per token
    expanded = (
        16 * cfg.num_layers * cfg.num_heads * (mla.nope_head_dim + mla.rope_head_dim + mla.v_head_dim) * 4
    )
    assert runner.block_bytes < expanded


def test_int8_kv_cache_is_refused_for_latent_attention(deepseek_v2):
    with pytest.raises(ValueError, match="DeepseekV2ForCausalLM: kv_cache_dtype='int8' is not supported"):
        LLM(deepseek_v2, device="cpu", dtype="float32", max_model_len=64, num_blocks=8, kv_cache_dtype="int8")


def test_experts_land_in_their_slices(tmp_path):
    path = save_tiny_model(tmp_path / "mixtral", "mixtral", widen=True)
    tensors = load_file(path / "model.safetensors")
    llm = LLM(path, device="cpu", dtype="float32", max_model_len=32, num_blocks=4)
    experts = llm.llm_engine.runner.model.model.layers[1].mlp.experts
    inter = experts.intermediate
    for e in range(4):
        base = f"model.layers.1.block_sparse_moe.experts.{e}"
        assert torch.equal(experts.w13_weight[e, :inter], tensors[f"{base}.w1.weight"])  # gate
        assert torch.equal(experts.w13_weight[e, inter:], tensors[f"{base}.w3.weight"])  # up
        assert torch.equal(experts.w2_weight[e], tensors[f"{base}.w2.weight"])  # down


def test_expert_names_route_to_stacked_parameters():
    assert expert_target("model.layers.3.mlp.experts.5.w3.weight") == (
        "model.layers.3.mlp.experts",
        "w13_weight",
        (5, 1),
    )
    assert expert_target("model.layers.0.mlp.experts.12.down_proj.weight_packed") == (
        "model.layers.0.mlp.experts", "w2_weight_packed", (12, None))  # fmt: skip
    assert expert_target("model.layers.0.mlp.experts.stacked_v1") == (
        "model.layers.0.mlp.experts",
        "w13_weight",
        (None, 1),
    )
    assert expert_target("model.layers.0.mlp.shared_expert.gate_proj.weight") is None
    assert expert_target("model.layers.0.mlp.gate.weight") is None


def test_a_checkpoint_with_more_experts_than_the_config_is_refused(tmp_path):
    path = save_tiny_model(tmp_path / "mixtral", "mixtral")
    config = (path / "config.json").read_text().replace('"num_local_experts": 4', '"num_local_experts": 3')
    (path / "config.json").write_text(config)
    with pytest.raises(ValueError, match="checkpoint has expert 3; the config says 3 experts"):
        LLM(path, device="cpu", dtype="float32", max_model_len=32, num_blocks=4)


@pytest.mark.parametrize(
    ("arch", "key", "value", "message"),
    [
        ("DeepseekV2ForCausalLM", "moe_layer_freq", 2, "config key 'moe_layer_freq' = 2 is not supported"),
        (
            "DeepseekV2ForCausalLM",
            "norm_topk_prob",
            True,
            "config key 'norm_topk_prob' = True is not supported",
        ),
        (
            "DeepseekV3ForCausalLM",
            "topk_method",
            "greedy",
            "config key 'topk_method' = 'greedy' is not supported",
        ),
        (
            "DeepseekV3ForCausalLM",
            "num_key_value_heads",
            2,
            "config key 'num_key_value_heads' = 2 is not supported",
        ),
        (
            "PhimoeForCausalLM",
            "num_experts_per_tok",
            4,
            "config key 'num_experts_per_tok' = 4 is not supported",
        ),
    ],
)
def test_moe_and_mla_keys_are_refused_by_name(arch, key, value, message):
    spec = {"DeepseekV2ForCausalLM": "deepseek_v2", "DeepseekV3ForCausalLM": "deepseek_v3",
            "PhimoeForCausalLM": "phimoe"}[arch]  # fmt: skip
    hf = {**tiny_hf_config(spec, 128).to_dict(), "architectures": [arch], key: value}
    with pytest.raises(ValueError, match=f"^{arch}: {message}"):
        ModelConfig.from_hf(hf)


def test_deepseek_layers_from_first_k_dense_replace_are_sparse(deepseek_v2):
    cfg = load_model_config(deepseek_v2)
    assert cfg.moe is not None and cfg.moe.layers == (False, True)
    assert (cfg.moe.num_groups, cfg.moe.topk_groups, cfg.moe.routed_scaling) == (2, 1, 1.5)


def test_grouped_routing_keeps_to_the_best_groups():
    """Two groups of three; the best group holds experts 0-2: top-2 stays there although expert 5
    alone scores higher than expert 1 (greedy would take 0 and 5)."""
    cfg = MoEConfig(num_experts=6, top_k=2, intermediate_size=8, layers=(True,), renormalize=False,
                    num_groups=2, topk_groups=1)  # fmt: skip
    logits = torch.tensor([[3.0, 1.0, 0.9, 0.1, 0.1, 2.0]]).log()  # softmax: these scores / 7.1
    weights, ids = route(logits, cfg)
    assert sorted(ids[0].tolist()) == [0, 1]  # group max: 3.0 vs 2.0
    greedy = MoEConfig(num_experts=6, top_k=2, intermediate_size=8, layers=(True,), renormalize=False)
    assert sorted(route(logits, greedy)[1][0].tolist()) == [0, 5]
    assert torch.allclose(weights.sum(), torch.tensor((3.0 + 1.0) / 7.1))


def test_deepseek_v3_multi_token_prediction_layers_are_skipped(tmp_path):
    """A V3 checkpoint carries num_nextn_predict_layers layers past the last one (model.layers.61 of the
    real model), which no forward runs: they load as nothing, while a stray tensor elsewhere is an error."""
    from safetensors.torch import save_file

    path = save_tiny_model(tmp_path / "v3", "deepseek_v3")
    tensors = load_file(path / "model.safetensors")
    save_file({**tensors, "model.layers.2.eh_proj.weight": torch.zeros(4, 4)}, path / "model.safetensors")
    assert load_model_config(path).skipped_layers == (2,)
    LLM(path, device="cpu", dtype="float32", max_model_len=32, num_blocks=4)
    save_file({**tensors, "model.layers.3.eh_proj.weight": torch.zeros(4, 4)}, path / "model.safetensors")
    with pytest.raises(ValueError, match="'model.layers.3.eh_proj.weight' has no matching parameter"):
        LLM(path, device="cpu", dtype="float32", max_model_len=32, num_blocks=4)


def test_phimoe_longrope_needs_one_mscale():
    hf = {**tiny_hf_config("phimoe_longrope", 128).to_dict(), "architectures": ["PhimoeForCausalLM"]}
    cfg = ModelConfig.from_hf(hf)
    assert cfg.rope_scaling is not None and cfg.rope_scaling["attention_factor"] == 1.25
    assert cfg.rope_scaling["long_factor"] == cfg.rope_scaling["short_factor"]  # as transformers rotates
    hf["rope_parameters"] = {**hf["rope_parameters"], "long_mscale": 1.5}
    with pytest.raises(ValueError, match="short_mscale=1.25 and long_mscale=1.5 differ"):
        ModelConfig.from_hf(hf)
