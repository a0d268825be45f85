"""The family table (runtime/models/families.py): every key with restricted values refuses an unsupported
value by architecture, key and value; the defaults are transformers' own; a missing required key is a
ValueError naming it (never a KeyError)."""

from __future__ import annotations

import copy
import json
import re

import pytest

from lmforge.runtime.models.config import ModelConfig, load_model_config
from lmforge.runtime.models.families import FAMILIES, SHAPE_KEYS, SUPPORTED_ROPE_TYPES, Key
from lmforge.runtime.models.tiny import TINY_SPECS, tiny_hf_config

_ROPE_KEYS = ("rope_theta", "rope_type", "partial_rotary_factor")
# one tiny spec per family: its config dict is the base each refusal is tried on
_SPEC_OF = {}
for _name, (_model_type, _) in TINY_SPECS.items():
    _SPEC_OF.setdefault(_model_type, _name)


def _base(architecture: str) -> dict:
    family = FAMILIES[architecture]
    hf = tiny_hf_config(_SPEC_OF[family.model_type], 128).to_dict()
    return {**hf, "architectures": [architecture]}


def _unsupported(spec: Key, num_layers: int):
    """A value outside spec.accepts of the kind the key holds."""
    accepts = spec.accepts
    if spec.each:
        return ["not-a-layer-type"] * num_layers
    if all(isinstance(v, bool) or v is None for v in accepts):  # a refused bool, else not a bool at all
        return next((v for v in (True, False) if v not in accepts), "not-a-real-value")
    if all(isinstance(v, float) for v in accepts):
        return 0.5
    return "not-a-real-value"


def _set(hf: dict, key: str, value) -> None:
    if key in _ROPE_KEYS:
        rope = hf["rope_parameters"]
        rope = rope.get("full_attention", rope)  # Gemma3: per layer type
        rope[key] = value
    elif "." in key:  # a nested config's key (DBRX: "ffn_config.moe_top_k")
        outer, inner = key.split(".", 1)
        hf[outer] = {**(hf.get(outer) or {}), inner: value}
    else:
        hf[key] = value


RESTRICTED = [
    (arch, key)
    for arch, family in FAMILIES.items()
    for key, spec in family.keys.items()
    if spec.accepts is not None
]


def test_the_table_restricts_the_keys_that_select_math():
    keys = {key for _, key in RESTRICTED}
    assert {
        "hidden_act",
        "hidden_activation",
        "attention_bias",
        "mlp_bias",
        "rope_type",
        "partial_rotary_factor",
        "layer_types",
        "use_sliding_window",
        "qk_layernorm",
        "use_parallel_residual",
        "use_qkv_bias",
        "use_bias",
        "use_qk_norm",
        "use_bidirectional_attention",
    } <= keys
    assert len(RESTRICTED) >= 60


def test_the_rope_types_accepted_are_the_ones_the_rope_tables_compute():
    from lmforge.kernels.rope_cache import ROPE_TYPES

    assert set(SUPPORTED_ROPE_TYPES) == {*ROPE_TYPES, "su"}  # "su": Phi-3's old name of longrope


@pytest.mark.parametrize(("architecture", "key"), RESTRICTED, ids=[f"{a}-{k}" for a, k in RESTRICTED])
def test_an_unsupported_value_is_refused_by_architecture_key_and_value(architecture, key):
    hf = _base(architecture)
    ModelConfig.from_hf(copy.deepcopy(hf))  # the base parses
    value = _unsupported(FAMILIES[architecture].keys[key], hf.get("num_hidden_layers") or hf["n_layers"])
    _set(hf, key, value)
    shown = repr(value[0] if isinstance(value, list) else value)
    with pytest.raises(
        ValueError, match=rf"^{architecture}: config key '{key}' = {re.escape(shown)} is not supported"
    ):
        ModelConfig.from_hf(hf)


@pytest.mark.parametrize("architecture", sorted(FAMILIES))
def test_table_defaults_are_transformers_defaults(architecture):
    """A key absent from config.json means what transformers' config class says; ours must agree."""
    from transformers import CONFIG_MAPPING

    family = FAMILIES[architecture]
    hf = CONFIG_MAPPING[family.model_type]().to_dict()
    rope = hf.get("rope_parameters") or {}
    rope = rope.get("full_attention", rope)
    checked = 0
    for key, spec in family.keys.items():
        source = rope if key in _ROPE_KEYS else hf
        if "." in key:  # DBRX's nested attn_config / ffn_config
            outer, key = key.split(".", 1)
            source = hf.get(outer) or {}
        if key in SHAPE_KEYS or key not in source:  # shapes: the size of a default model, not a behaviour
            continue
        if (
            key == "layer_types"
        ):  # derived per layer by the config class; ours derive the same from the window
            continue
        if key == "sliding_window" and "use_sliding_window" in family.keys:
            continue  # Qwen2/3 configs null the window unless use_sliding_window; ours ignore it the same way
        assert source[key] == spec.default, (
            f"{architecture}.{key}: transformers {source[key]!r}, table {spec.default!r}"
        )
        checked += 1
    assert checked >= 4


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "GPTNeoXForCausalLM"])
def test_a_missing_shape_key_names_it(architecture):
    hf = _base(architecture)
    del hf["intermediate_size"]
    with pytest.raises(ValueError, match=f"^{architecture}: config.json lacks the key 'intermediate_size'"):
        ModelConfig.from_hf(hf)


def test_a_llama_with_another_activation_is_read_not_ignored(tmp_path):
    """The bug of issue #17: hidden_act was never read. Now it is read, and an unknown one is refused
    at load (through transformers' normalization, which keeps it)."""
    hf = {**_base("LlamaForCausalLM"), "hidden_act": "gelu_pytorch_tanh"}
    assert ModelConfig.from_hf(hf).hidden_act == "gelu_tanh"
    (tmp_path / "config.json").write_text(json.dumps({**hf, "hidden_act": "gelu_fast"}))
    with pytest.raises(
        ValueError, match="LlamaForCausalLM: config key 'hidden_act' = 'gelu_fast' is not supported"
    ):
        load_model_config(tmp_path)


def test_per_layer_windows_follow_layer_types():
    hf = _base("Gemma2ForCausalLM")
    hf.update(
        num_hidden_layers=4,
        sliding_window=32,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    )
    cfg = ModelConfig.from_hf(hf)
    assert cfg.layer_sliding_windows == (32, None, 32, None) and cfg.sliding_window == 32
    qwen = {
        **_base("Qwen2ForCausalLM"),
        "num_hidden_layers": 4,
        "use_sliding_window": True,
        "sliding_window": 16,
        "max_window_layers": 2,
        "layer_types": None,
    }
    assert ModelConfig.from_hf(qwen).layer_sliding_windows == (None, None, 16, 16)
    assert ModelConfig.from_hf({**qwen, "use_sliding_window": False}).layer_sliding_windows == ()


def test_gemma3_reads_each_layer_types_rope():
    cfg = ModelConfig.from_hf(_base("Gemma3ForCausalLM"))
    assert (cfg.rope_theta, cfg.rope_scaling["rope_type"], cfg.rope_scaling["factor"]) == (1e6, "linear", 4.0)
    assert (cfg.local_rope_theta, cfg.local_rope_scaling) == (10000.0, None)
    assert cfg.attn_scale == 24**-0.5 and cfg.layer_sliding_windows == (24, None)
    assert cfg.local_rope_layers == (True, False)
    no_window = ModelConfig.from_hf({**_base("Gemma3ForCausalLM"), "sliding_window": None})
    assert no_window.layer_sliding_windows == () and no_window.local_rope_layers == (
        True,
        False,
    )  # HF: by type
