"""rope_cache tables against transformers' own rotary code (ROPE_INIT_FUNCTIONS and the models' rotary classes).

inv_freq must be bit-identical: at position 1e5 one fp32 ulp of inv_freq moves the angle by ~1e-2 rad.
cos/sin (attention factor included) must agree to 1e-6 at positions across the whole served range.
"""

import math

import pytest
import torch
from transformers import LlamaConfig, Phi3Config, Qwen2Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

from lmforge.kernels import rope_cache
from lmforge.kernels.rope_cache import (
    attention_factor,
    build_longrope_cache,
    build_rope_cache,
    compute_inv_freq,
    cos_sin,
    dynamic_inv_freq_table,
    hf_seq_lens,
    longrope_rows,
    validate_rope_scaling,
)

COS_SIN_TOL = dict(atol=1e-6, rtol=0)


def hf_table(rotary, position_ids: torch.Tensor) -> torch.Tensor:
    """HF's cos/sin [N, R] (cos half | sin half, attention scaling applied) for positions [N], fp32."""
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), position_ids[None])
    half = cos.shape[-1] // 2
    return torch.cat([cos[0, :, :half], sin[0, :, :half]], dim=-1)


def spread_positions(max_positions: int, *marks: int) -> torch.Tensor:
    """~1000 positions over [0, max_positions), with every boundary +-1 around the marks."""
    step = max(1, max_positions // 1000)
    picks = set(range(0, max_positions, step)) | {max_positions - 1}
    for m in marks:
        picks |= {p for p in (m - 2, m - 1, m, m + 1) if 0 <= p < max_positions}
    return torch.tensor(sorted(picks))


# --- yarn ----------------------------------------------------------------------------------------------

YARN_CASES = {
    # Qwen2.5-7B-Instruct's long-context setting (config.json "rope_scaling")
    "qwen2.5": dict(cls="qwen2", head_dim=128, theta=1000000.0, mpe=131072,
                    scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
    # DeepSeek style: mscale / mscale_all_dim set the attention factor
    "deepseek": dict(cls="llama", head_dim=64, theta=10000.0, mpe=163840,
                     scaling={"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                              "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.707}),
    "explicit-attention-factor-no-truncate": dict(cls="llama", head_dim=64, theta=500000.0, mpe=16384,
        scaling={"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 2048, "beta_fast": 16.0,
                 "beta_slow": 2.0, "attention_factor": 1.25, "truncate": False}),
    "partial-rotary": dict(cls="llama", head_dim=96, theta=10000.0, mpe=8192,
                           scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 4096,
                                    "partial_rotary_factor": 0.5}),
}  # fmt: skip


def _hf_config(cls: str, head_dim: int, theta: float, mpe: int, scaling: dict):
    params = {"rope_theta": theta, **scaling}
    common = dict(hidden_size=head_dim * 4, num_attention_heads=4, num_key_value_heads=4,
                  max_position_embeddings=mpe, rope_parameters=params)  # fmt: skip
    if cls == "qwen2":
        return Qwen2Config(**common)
    if cls == "phi3":
        return Phi3Config(
            **common, original_max_position_embeddings=scaling["original_max_position_embeddings"]
        )
    return LlamaConfig(**common, head_dim=head_dim)


@pytest.mark.parametrize("case", list(YARN_CASES), ids=list(YARN_CASES))
def test_yarn_matches_transformers(case):
    c = YARN_CASES[case]
    config = _hf_config(c["cls"], c["head_dim"], c["theta"], c["mpe"], dict(c["scaling"]))
    rotary = (Qwen2RotaryEmbedding if c["cls"] == "qwen2" else LlamaRotaryEmbedding)(config=config)
    rotary_dim = int(c["head_dim"] * c["scaling"].get("partial_rotary_factor", 1.0))
    expected_inv, expected_factor = ROPE_INIT_FUNCTIONS["yarn"](config)
    assert torch.equal(compute_inv_freq(rotary_dim, c["theta"], c["scaling"]), expected_inv)
    assert torch.equal(rotary.inv_freq, expected_inv)
    assert attention_factor(c["scaling"]) == expected_factor == rotary.attention_scaling
    assert expected_factor != 1.0  # the factor is really exercised

    table = build_rope_cache(rotary_dim, c["mpe"], c["theta"], c["scaling"])
    positions = spread_positions(c["mpe"], c["scaling"]["original_max_position_embeddings"])
    torch.testing.assert_close(table[positions], hf_table(rotary, positions), **COS_SIN_TOL)


def test_yarn_factor_none_uses_the_context_ratio():
    """HF: factor None -> max_position_embeddings / original_max_position_embeddings (needs the former)."""
    scaling = {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 1024}
    config = _hf_config("llama", 64, 10000.0, 8192, dict(scaling))
    inv, factor = ROPE_INIT_FUNCTIONS["yarn"](config)
    assert torch.equal(compute_inv_freq(64, 10000.0, scaling, max_position_embeddings=8192), inv)
    assert attention_factor(scaling, 8192) == factor
    with pytest.raises(ValueError, match="rope_type 'yarn': factor=None needs max_position_embeddings"):
        compute_inv_freq(64, 10000.0, scaling)


def test_yarn_is_not_llama3_or_plain():
    """Negative control: the yarn table differs from plain RoPE past the high-frequency dims."""
    scaling = YARN_CASES["qwen2.5"]["scaling"]
    assert not torch.allclose(
        build_rope_cache(128, 64, 1e6, scaling), build_rope_cache(128, 64, 1e6), atol=1e-3
    )


# --- longrope --------------------------------------------------------------------------------------------


def _phi3_longrope(head_dim=32, mpe=512, omp=64, partial=1.0, factor=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = int(head_dim * partial) // 2
    scaling = {"rope_type": "longrope", "original_max_position_embeddings": omp,
               "short_factor": (1 + 0.1 * torch.rand(n, generator=gen)).tolist(),
               "long_factor": (1 + 8 * torch.rand(n, generator=gen)).tolist()}  # fmt: skip
    if partial != 1.0:
        scaling["partial_rotary_factor"] = partial
    if factor is not None:
        scaling["factor"] = factor
    config = Phi3Config(hidden_size=head_dim * 4, num_attention_heads=4, num_key_value_heads=4,
                        max_position_embeddings=mpe, original_max_position_embeddings=omp,
                        rope_parameters={"rope_theta": 10000.0, **scaling})  # fmt: skip
    return scaling, config


@pytest.mark.parametrize("partial,factor", [(1.0, None), (0.75, None), (1.0, 6.0)],
                         ids=["phi3-mini-128k", "partial-0.75", "explicit-factor"])  # fmt: skip
def test_longrope_matches_transformers(partial, factor):
    head_dim, mpe, omp = 32, 512, 64
    scaling, config = _phi3_longrope(head_dim, mpe, omp, partial, factor)
    rotary_dim = int(head_dim * partial)
    short_inv, expected_factor = ROPE_INIT_FUNCTIONS["longrope"](config)
    long_inv, _ = ROPE_INIT_FUNCTIONS["longrope"](config, seq_len=omp + 1)
    assert torch.equal(compute_inv_freq(rotary_dim, 10000.0, scaling, max_position_embeddings=mpe), short_inv)
    assert torch.equal(rope_cache.longrope_inv_freq(rotary_dim, 10000.0, scaling["long_factor"]), long_inv)
    assert attention_factor(scaling, mpe) == expected_factor
    assert expected_factor == pytest.approx(math.sqrt(1 + math.log(factor or mpe / omp) / math.log(omp)))

    table = build_longrope_cache(rotary_dim, mpe, 10000.0, scaling, max_position_embeddings=mpe)
    assert table.shape == (2 * mpe, rotary_dim)
    rotary = Phi3RotaryEmbedding(config=config)
    # One forward over [0, L) as HF runs a prompt of length L: short factors up to omp, long beyond.
    for prompt_len in (omp - 1, omp, omp + 1, mpe):
        positions = torch.arange(prompt_len)
        rows = longrope_rows(positions, torch.full_like(positions, prompt_len), mpe, omp)
        torch.testing.assert_close(table[rows], hf_table(rotary, positions), **COS_SIN_TOL)
        assert bool((rows >= mpe).all()) == (prompt_len > omp)


def test_longrope_short_and_long_differ():
    """Negative control: the long half of the table is not the short half."""
    scaling, _ = _phi3_longrope()
    table = build_longrope_cache(32, 512, 10000.0, scaling, max_position_embeddings=512)
    assert not torch.allclose(table[100], table[512 + 100], atol=1e-2)


def test_su_is_longrope():
    scaling, _ = _phi3_longrope()
    su = {**scaling, "type": "su"}
    del su["rope_type"]
    assert validate_rope_scaling(su, 512)["rope_type"] == "longrope"
    assert torch.equal(build_longrope_cache(32, 64, 1e4, su, max_position_embeddings=512),
                       build_longrope_cache(32, 64, 1e4, scaling, max_position_embeddings=512))  # fmt: skip


# --- dynamic NTK -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head_dim,factor,mpe", [(64, 2.0, 128), (80, 3.7, 100), (128, 4.0, 64)])
def test_dynamic_inv_freq_rows_bit_identical(head_dim, factor, mpe):
    """Row s-1 of the table equals HF's recomputation for sequence length s (a 0-d tensor, as
    dynamic_rope_update passes it), for every s up to 40x the threshold; rows <= threshold: HF's init set."""
    scaling = {"rope_type": "dynamic", "factor": factor}
    config = _hf_config("llama", head_dim, 10000.0, mpe, dict(scaling))
    max_positions = 40 * mpe
    table = dynamic_inv_freq_table(head_dim, 10000.0, factor, mpe, max_positions)
    init_inv, _ = ROPE_INIT_FUNCTIONS["dynamic"](config)
    assert torch.equal(table[:mpe], init_inv.expand(mpe, -1))
    assert torch.equal(compute_inv_freq(head_dim, 10000.0, scaling, max_position_embeddings=mpe), init_inv)
    for s in range(mpe + 1, max_positions + 1):
        expected, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, seq_len=torch.tensor(s))
        assert torch.equal(table[s - 1], expected), s


def test_dynamic_needs_its_threshold():
    with pytest.raises(
        ValueError, match="rope_type 'dynamic': its length threshold needs max_position_embeddings"
    ):
        validate_rope_scaling({"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="original_max_position_embeddings=2048 differs"):
        validate_rope_scaling(
            {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 2048}, 4096
        )
    with pytest.raises(ValueError, match="depends on the sequence length"):
        build_rope_cache(64, 128, 1e4, {"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=64)


def test_hf_seq_lens():
    """Prompt tokens see the prompt length, generated ones their own position + 1."""
    positions = torch.tensor([0, 1, 2, 3, 7, 3])
    prompt_lens = torch.tensor([4, 4, 4, 4, 4, 2])
    assert hf_seq_lens(positions, prompt_lens).tolist() == [4, 4, 4, 4, 8, 4]


def test_cos_sin_layout_and_scale():
    inv = compute_inv_freq(8, 100.0)
    rows = cos_sin(torch.tensor([3]), inv, 1.5)
    torch.testing.assert_close(rows[0, :4], torch.cos(3 * inv) * 1.5)
    torch.testing.assert_close(rows[0, 4:], torch.sin(3 * inv) * 1.5)


# --- refusals -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scaling,match",
    [
        ({"rope_type": "mrope", "mrope_section": [2, 2]}, "rope_type 'mrope' is not supported"),
        ({"rope_type": "proportional"}, "rope_type 'proportional' is not supported"),
        ({"rope_type": "linear"}, "rope_type 'linear' needs the key 'factor'"),
        ({"rope_type": "linear", "factor": 2.0, "mrope_section": [4]}, "key 'mrope_section'"),
        ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}, "needs the key 'high_freq_factor'"),
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": "x"},
         "'beta_fast' must be a number"),
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "truncate": 1},
         "'truncate' must be true or false"),
        ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0], "original_max_position_embeddings": 32,
          "low_freq_factor": 1.0}, "key 'low_freq_factor'"),
        ({"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]},
         "rope_type 'longrope' needs 'original_max_position_embeddings'"),
        ({"rope_type": "linear", "factor": None}, "'factor' of rope_type 'linear' is null"),
        ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": "2.0", "original_max_position_embeddings": 32},
         "'long_factor' must be a list of numbers"),
    ],
    ids=["mrope", "proportional", "linear-no-factor", "unknown-key", "llama3-missing", "yarn-bad-value",
         "yarn-bad-truncate", "longrope-foreign-key", "longrope-no-original-max", "null-factor",
         "longrope-bad-list"],
)  # fmt: skip
def test_unsupported_rope_scaling_is_refused_by_name(scaling, match):
    with pytest.raises(ValueError, match=match):
        validate_rope_scaling(scaling, 4096)


def test_longrope_factor_length_is_checked():
    scaling, _ = _phi3_longrope(head_dim=32)
    with pytest.raises(ValueError, match="need rotary_dim/2 = 8 values, got 16"):
        build_longrope_cache(16, 64, 1e4, scaling, max_position_embeddings=512)


def test_tables_ignore_the_default_dtype_and_build_on_the_cpu():
    """The model runner builds models under a bf16 default dtype: the tables stay HF's fp32 values."""
    longrope, _ = _phi3_longrope()
    expected = (
        build_rope_cache(32, 300, 1e4, YARN_CASES["qwen2.5"]["scaling"]),
        build_longrope_cache(32, 300, 1e4, longrope, max_position_embeddings=512),
        dynamic_inv_freq_table(32, 1e4, 2.0, 64, 300),
    )
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        got = (
            build_rope_cache(32, 300, 1e4, YARN_CASES["qwen2.5"]["scaling"]),
            build_longrope_cache(32, 300, 1e4, longrope, max_position_embeddings=512),
            dynamic_inv_freq_table(32, 1e4, 2.0, 64, 300),
        )
    finally:
        torch.set_default_dtype(old)
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    with torch.device("meta"):  # a default device: the table lands there, computed elsewhere
        assert build_rope_cache(8, 4, 100.0).device.type == "meta"
