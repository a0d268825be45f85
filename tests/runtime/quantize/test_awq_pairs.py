"""The AWQ scale-pair table (awq_pairs.py) against each family's real transformers graph: folding random
positive scales into every pair of every layer must leave the logits unchanged (the fold is exact), and a
pair with a consumer left out must change them (the check has teeth)."""

from __future__ import annotations

import pytest
import torch

from lmforge.runtime.models.tiny_legacy import legacy_hf_config, widen_weights
from lmforge.runtime.quantize import awq
from lmforge.runtime.quantize.awq_pairs import AWQ_PAIRS, ScalePair, pairs_for
from lmforge.runtime.quantize.calibration import decoder_layers
from lmforge.runtime.quantize.config import QuantizeError

torch.set_num_threads(1)

SMALL = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    intermediate_size=128,
    pad_token_id=0,
    bos_token_id=0,
    eos_token_id=1,
)
# case id -> (model_type or legacy tiny arch, config overrides, pairs expected to apply per layer)
CASES: dict[str, tuple[str, dict, int]] = {
    "llama": ("llama", {}, 4),
    "mistral": ("mistral", {}, 4),
    "qwen2": ("qwen2", {}, 4),
    "qwen3": ("qwen3", {}, 4),
    "gemma": ("gemma", {}, 4),
    "gemma2": ("gemma2", {}, 4),
    "gemma3_text": ("gemma3_text", {}, 4),
    "phi3": ("phi3", {}, 4),
    "phi": ("phi", {}, 2),
    "gpt_neox": ("gpt_neox", {}, 3),
    "gpt_neox-sequential": ("gpt_neox", {"use_parallel_residual": False}, 3),
    "stablelm": ("stablelm", {}, 4),
    "stablelm-parallel": ("stablelm", {"use_parallel_residual": True}, 3),
    "olmo": ("olmo", {}, 2),
    "olmo2": ("olmo2", {}, 2),
    "starcoder2": ("starcoder2", {}, 3),
    "glm": ("glm", {}, 4),
    "glm4": ("glm4", {}, 4),
    "cohere": ("cohere", {}, 3),
    "opt": ("legacy:opt", {}, 4),
    "opt-postln": ("legacy:opt-postln", {}, 2),
    "bloom": ("legacy:bloom", {}, 3),
    "bloom-residual-post-ln": ("legacy:bloom", {"apply_residual_connection_post_layernorm": True}, 1),
    "mpt": ("legacy:mpt", {}, 2),
    "mpt-noclip": ("legacy:mpt", {"attn_config": {"clip_qkv": None}}, 3),
    "falcon": ("legacy:falcon", {}, 1),
    "falcon-40b": ("legacy:falcon-40b", {}, 2),
    "falcon-11b": ("legacy:falcon-11b", {}, 1),
    "falcon-rw": ("legacy:falcon-rw", {}, 3),
}


def tiny_hf_model(kind: str, overrides: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    if kind.startswith("legacy:"):
        config = legacy_hf_config(kind.removeprefix("legacy:"), 128, hidden_size=64, **overrides)
    else:
        config = AutoConfig.for_model(kind, **{**SMALL, **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
    widen_weights(model, seed=1)
    return model


def fold_everywhere(model, pairs: list[ScalePair]) -> int:
    """Folds random scales in [0.5, 2] into every applicable pair of every layer; returns pairs per layer."""
    g = torch.Generator().manual_seed(2)
    _, layers = decoder_layers(model)
    counts = set()
    for layer in layers:
        linears = {name for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        groups = awq.layer_groups(layer, linears, pairs, model.config.num_attention_heads)
        modules = dict(layer.named_modules())
        for pair, rows in groups:
            width = modules[pair.consumers[0]].in_features
            scales = torch.rand(width, generator=g) * 1.5 + 0.5
            awq.fold_scales(modules[pair.previous], [modules[n] for n in pair.consumers], scales, rows)
        counts.add(len(groups))
    assert len(counts) == 1
    return counts.pop()


def logits(model) -> torch.Tensor:
    ids = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(ids).logits[0]


@pytest.mark.parametrize("case", CASES)
def test_folding_every_pair_keeps_the_function(case):
    kind, overrides, expected_pairs = CASES[case]
    model = tiny_hf_model(kind, overrides)
    before = logits(model)
    assert fold_everywhere(model, pairs_for(model.config.to_dict())) == expected_pairs
    after = logits(model)
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4 * float(before.abs().max())), float(
        (after - before).abs().max()
    )


@pytest.mark.parametrize(
    "case, broken",
    [
        ("phi", [ScalePair("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))]),
        ("falcon", [ScalePair("input_layernorm", ("self_attention.query_key_value",))]),
        ("gemma2", [ScalePair("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))]),
        ("bloom-residual-post-ln", [ScalePair("input_layernorm", ("self_attention.query_key_value",))]),
    ],
    ids=["phi-parallel-mlp-left-out", "falcon-parallel-mlp-left-out", "gemma2-post-norm", "bloom-residual"],
)
def test_a_wrong_pair_changes_the_function(case, broken):
    kind, overrides, _ = CASES[case]
    model = tiny_hf_model(kind, overrides)
    before = logits(model)
    assert fold_everywhere(model, broken) == 1
    assert not torch.allclose(logits(model), before, rtol=1e-3, atol=1e-3 * float(before.abs().max()))


def test_every_table_entry_is_exercised():
    covered = {kind.removeprefix("legacy:") for kind, _, _ in CASES.values()}
    covered = {"opt" if c.startswith("opt") else "falcon" if c.startswith("falcon") else c for c in covered}
    assert set(AWQ_PAIRS) <= covered


def test_unknown_family_is_refused_by_name():
    with pytest.raises(QuantizeError, match=r"model_type 'gpt2'.*use w4a16-gptq or w4a16-rtn"):
        pairs_for({"model_type": "gpt2"})
