"""RotaryEmbedding (the layer every family uses) against transformers' rotary classes and apply functions.

Families: partial rotary (GPT-NeoX rotary_pct, Phi, StableLM, GLM/GLM-4, GPT-J rotary_dim), the
interleaved layout (GLM, GLM-4, Cohere, GPT-J), longrope (Phi-3, with partial rotary as Phi-4-mini) and
dynamic NTK, the last two as HF generates: one forward for the prompt, one per new token, KV cached.
HF's dynamic rotary is stateful (a later, shorter sequence keeps the largest length seen unless it falls
below max_position_embeddings); the reference here is a fresh HF rotary per sequence, what
`transformers.generate` on a freshly loaded model does.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import transformers

from lmforge.kernels.backend import get_ops
from lmforge.runtime.models.layers import RotaryEmbedding

OPS = get_ops("cpu", "torch")
QK_TOL = dict(atol=2e-6, rtol=2e-6)  # fp32: q/k ~N(0, 1), products of fp32 cos/sin


def _module(family: str):
    return importlib.import_module(f"transformers.models.{family}.modeling_{family}")


# family -> (config class, config kwargs, rotary class, our rotary_dim, is_neox_style)
FAMILIES = {
    "gpt_neox": ("GPTNeoXConfig", dict(rotary_pct=0.25), "GPTNeoXRotaryEmbedding", 8, True),
    "phi": ("PhiConfig", dict(partial_rotary_factor=0.5), "PhiRotaryEmbedding", 16, True),
    "stablelm": ("StableLmConfig", dict(partial_rotary_factor=0.25), "StableLmRotaryEmbedding", 8, True),
    "glm": ("GlmConfig", dict(partial_rotary_factor=0.5, head_dim=32), "GlmRotaryEmbedding", 16, False),
    "glm4": ("Glm4Config", dict(partial_rotary_factor=0.5, head_dim=32), "Glm4RotaryEmbedding", 16, False),
    "cohere": ("CohereConfig", {}, "CohereRotaryEmbedding", 32, False),
    "llama": ("LlamaConfig", dict(head_dim=32), "LlamaRotaryEmbedding", 32, True),
}
HEADS, HEAD_DIM, MAX_POS = 4, 32, 4096


def _hf_config(family: str):
    config_cls, kwargs, *_ = FAMILIES[family]
    return getattr(transformers, config_cls)(hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS,
                                             num_key_value_heads=HEADS, max_position_embeddings=MAX_POS,
                                             intermediate_size=64, **kwargs)  # fmt: skip


def _theta(family: str) -> float:
    return _hf_config(family).rope_parameters["rope_theta"]  # Cohere's default is 500000


def _hf_rotated(family: str, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
    """HF's rotation of q [T, H, D], k [T, Hkv, D] (its own rotary class and apply_rotary_pos_emb)."""
    _, _, rotary_cls, rotary_dim, _ = FAMILIES[family]
    config = _hf_config(family)
    mod = _module(family)
    rotary = getattr(mod, rotary_cls)(config=config)
    cos, sin = rotary(q, positions[None])  # [1, T, R]
    assert cos.shape[-1] == rotary_dim  # the config really asks for this much rotary
    qh, kh = q.transpose(0, 1)[None], k.transpose(0, 1)[None]  # [1, H, T, D]
    q_rot, k_rot = mod.apply_rotary_pos_emb(qh[..., :rotary_dim], kh[..., :rotary_dim], cos, sin)
    q_out = torch.cat([q_rot, qh[..., rotary_dim:]], dim=-1)[0].transpose(0, 1)
    k_out = torch.cat([k_rot, kh[..., rotary_dim:]], dim=-1)[0].transpose(0, 1)
    return q_out, k_out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_partial_and_interleaved_match_transformers(family):
    _, kwargs, _, rotary_dim, is_neox_style = FAMILIES[family]
    positions = torch.cat([torch.arange(8), torch.randint(8, MAX_POS, (24,))])
    q, k = torch.randn(32, HEADS, HEAD_DIM), torch.randn(32, 2, HEAD_DIM)
    q_hf, k_hf = _hf_rotated(family, q, k, positions)
    partial = {"partial_rotary_factor": kwargs.get("partial_rotary_factor", kwargs.get("rotary_pct", 1.0))}
    rotary = RotaryEmbedding(HEAD_DIM, MAX_POS, _theta(family), None, OPS, rotary_dim=rotary_dim,
                             is_neox_style=is_neox_style)  # fmt: skip
    q_ours, k_ours = q.clone(), k.clone()
    rotary(positions, q_ours, k_ours)
    torch.testing.assert_close(q_ours, q_hf, **QK_TOL)
    torch.testing.assert_close(k_ours, k_hf, **QK_TOL)
    assert torch.equal(q_ours[..., rotary_dim:], q[..., rotary_dim:])  # the rest passes through untouched
    # rotary_dim from the scaling dict's partial_rotary_factor (transformers 5 keeps it in rope_parameters)
    from_factor = RotaryEmbedding(HEAD_DIM, 64, _theta(family), {"rope_type": "default", **partial}, OPS,
                                  is_neox_style=is_neox_style)  # fmt: skip
    assert from_factor.rotary_dim == rotary_dim


@pytest.mark.parametrize("family", ["glm", "cohere", "phi"])
def test_wrong_layout_or_dim_fails(family):
    """Negative control: the other layout (or full rotary where HF is partial) does not match HF."""
    _, _, _, rotary_dim, is_neox_style = FAMILIES[family]
    positions = torch.randint(1, MAX_POS, (16,))
    q, k = torch.randn(16, HEADS, HEAD_DIM), torch.randn(16, 2, HEAD_DIM)
    q_hf, _ = _hf_rotated(family, q, k, positions)
    for kwargs in (
        dict(rotary_dim=rotary_dim, is_neox_style=not is_neox_style),
        dict(rotary_dim=HEAD_DIM if rotary_dim < HEAD_DIM else HEAD_DIM // 2, is_neox_style=is_neox_style),
    ):
        q_ours = q.clone()
        RotaryEmbedding(HEAD_DIM, MAX_POS, _theta(family), None, OPS, **kwargs)(positions, q_ours, k.clone())
        assert not torch.allclose(q_ours, q_hf, atol=1e-2)


def test_gptj_matches_transformers():
    """GPT-J: its own sinusoid table (sin | cos) and rotate_every_two on the first rotary_dim dims."""
    mod = _module("gptj")
    config = transformers.GPTJConfig(
        n_embd=HEADS * HEAD_DIM, n_head=HEADS, rotary_dim=16, n_positions=MAX_POS
    )
    positions = torch.randint(0, MAX_POS, (12,))
    q = torch.randn(12, HEADS, HEAD_DIM)
    sin, cos = mod.GPTJRotaryEmbedding(config)(q, positions[None])  # [1, T, R/2]
    qh = q[None]  # GPT-J rotates [B, T, H, D]
    expected = torch.cat([mod.apply_rotary_pos_emb(qh[..., :16], sin, cos), qh[..., 16:]], dim=-1)[0]
    ours = q.clone()
    RotaryEmbedding(HEAD_DIM, MAX_POS, 10000.0, None, OPS, rotary_dim=16, is_neox_style=False)(
        positions, ours, torch.randn(12, 1, HEAD_DIM)
    )
    torch.testing.assert_close(ours, expected, **QK_TOL)


# --- length-dependent types, as HF generates ------------------------------------------------------------------


def _hf_generate_tables(rotary, prompt_len: int, total_len: int) -> torch.Tensor:
    """cos | sin [total_len, R] each token got from HF: one forward over the prompt, then one per token."""
    x = torch.zeros(1)
    rows = []
    cos, sin = rotary(x, torch.arange(prompt_len)[None])
    rows.append((cos[0], sin[0]))
    for p in range(prompt_len, total_len):
        cos, sin = rotary(x, torch.tensor([[p]]))
        rows.append((cos[0], sin[0]))
    cos, sin = torch.cat([c for c, _ in rows]), torch.cat([s for _, s in rows])
    half = cos.shape[-1] // 2
    return torch.cat([cos[:, :half], sin[:, :half]], dim=-1)


def _phi3(partial: float = 1.0, mpe: int = 256, omp: int = 32):
    rotary_dim = int(HEAD_DIM * partial)
    gen = torch.Generator().manual_seed(1)
    scaling = {"rope_type": "longrope", "original_max_position_embeddings": omp,
               "short_factor": (1 + 0.2 * torch.rand(rotary_dim // 2, generator=gen)).tolist(),
               "long_factor": (1 + 6 * torch.rand(rotary_dim // 2, generator=gen)).tolist()}  # fmt: skip
    if partial != 1.0:
        scaling["partial_rotary_factor"] = partial
    config = transformers.Phi3Config(hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                                     max_position_embeddings=mpe, original_max_position_embeddings=omp,
                                     rope_parameters={"rope_theta": 10000.0, **scaling})  # fmt: skip
    return scaling, config


def _dynamic(mpe: int = 32, factor: float = 3.0):
    scaling = {"rope_type": "dynamic", "factor": factor}
    config = transformers.LlamaConfig(
        hidden_size=HEADS * HEAD_DIM,
        num_attention_heads=HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=mpe,
        rope_parameters={"rope_theta": 10000.0, **scaling},
    )
    return scaling, config


CASES = {  # name -> (scaling/config maker, HF rotary class, served context)
    "longrope": (lambda: _phi3(), _module("phi3").Phi3RotaryEmbedding, 256),
    "longrope-partial": (lambda: _phi3(partial=0.75), _module("phi3").Phi3RotaryEmbedding, 256),
    "dynamic": (lambda: _dynamic(), _module("llama").LlamaRotaryEmbedding, 160),
}
# (prompt_len, total_len): short prompt decoding past the threshold, prompt past it, at it
SEQUENCES = [(10, 70), (50, 90), (32, 40), (33, 36)]


@pytest.mark.parametrize("case", list(CASES))
def test_length_dependent_types_match_hf_generate(case):
    make, rotary_cls, served = CASES[case]
    scaling, config = make()
    ours = RotaryEmbedding(
        HEAD_DIM, served, 10000.0, scaling, OPS, max_position_embeddings=config.max_position_embeddings
    )
    assert ours.needs_prompt_lens
    # One flattened batch holding every sequence whole (as a recompute after preemption would),
    # then the same tokens again as separate chunks / decode steps: both must equal HF's per-sequence run.
    positions = torch.cat([torch.arange(total) for _, total in SEQUENCES])
    prompt_lens = torch.cat([torch.full((total,), prompt) for prompt, total in SEQUENCES])
    expected = torch.cat([_hf_generate_tables(rotary_cls(config=config), p, t) for p, t in SEQUENCES])
    rows, table = ours.lookup(positions, prompt_lens)
    torch.testing.assert_close(table[rows], expected, atol=1e-6, rtol=0)
    perm = torch.randperm(positions.numel())  # token order in a batch does not matter
    rows, table = ours.lookup(positions[perm], prompt_lens[perm])
    torch.testing.assert_close(table[rows], expected[perm], atol=1e-6, rtol=0)

    # Applied to q/k through the layer (the path the model runs), against HF's rotate_half.
    q, k = torch.randn(positions.numel(), HEADS, HEAD_DIM), torch.randn(positions.numel(), 2, HEAD_DIM)
    q_ours, k_ours = q.clone(), k.clone()
    ours(positions, q_ours, k_ours, prompt_lens)
    r = ours.rotary_dim
    cos, sin = expected[:, None, : r // 2].repeat(1, 1, 2), expected[:, None, r // 2 :].repeat(1, 1, 2)
    rotate_half = torch.cat([-q[..., r // 2 : r], q[..., : r // 2]], dim=-1)
    q_hf = torch.cat([q[..., :r] * cos + rotate_half * sin, q[..., r:]], dim=-1)
    torch.testing.assert_close(q_ours, q_hf, **QK_TOL)


@pytest.mark.parametrize("case", list(CASES))
def test_length_dependent_negative_control(case):
    """Rotating by position alone (prompt_len = 0: every token "decoding") differs from HF for a long prompt."""
    make, rotary_cls, served = CASES[case]
    scaling, config = make()
    ours = RotaryEmbedding(
        HEAD_DIM, served, 10000.0, scaling, OPS, max_position_embeddings=config.max_position_embeddings
    )
    prompt, total = 50, 60
    expected = _hf_generate_tables(rotary_cls(config=config), prompt, total)
    rows, table = ours.lookup(torch.arange(total), torch.zeros(total, dtype=torch.long))
    assert not torch.allclose(table[rows][:prompt], expected[:prompt], atol=1e-3)


def test_length_dependent_needs_prompt_lens_only_past_the_threshold():
    scaling, config = _phi3()
    long_ctx = RotaryEmbedding(HEAD_DIM, 256, 10000.0, scaling, OPS, max_position_embeddings=256)
    with pytest.raises(
        ValueError, match="rope_type 'longrope' with a served context of 256 > 32 .* needs prompt_lens"
    ):
        long_ctx(torch.arange(4), torch.randn(4, 2, HEAD_DIM), torch.randn(4, 2, HEAD_DIM))
    # Served context within original_max_position_embeddings: every sequence is short; no prompt_lens needed.
    short_ctx = RotaryEmbedding(HEAD_DIM, 32, 10000.0, scaling, OPS, max_position_embeddings=256)
    assert not short_ctx.needs_prompt_lens
    expected = _hf_generate_tables(_module("phi3").Phi3RotaryEmbedding(config=config), 20, 32)
    rows, table = short_ctx.lookup(torch.arange(32))
    torch.testing.assert_close(table[rows], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(scaling={"rope_type": "default", "partial_rotary_factor": 0.5}, rotary_dim=8),
         "rotary_dim=8 disagrees with partial_rotary_factor=0.5"),
        (dict(scaling=None, rotary_dim=7), "rotary_dim must be even"),
        (dict(scaling=None, rotary_dim=64), "rotary_dim must be even and in \\(0, head_dim=32\\]"),
        (dict(scaling={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}), "rope_theta=500.0 differs"),
        (dict(scaling={"rope_type": "dynamic", "factor": 2.0}), "rope_type 'dynamic': its length threshold"),
        (dict(scaling={"rope_type": "mrope"}), "rope_type 'mrope' is not supported"),
    ],
    ids=["partial-mismatch", "odd", "too-big", "theta-mismatch", "dynamic-no-mpe", "unknown-type"],
)  # fmt: skip
def test_refusals_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RotaryEmbedding(HEAD_DIM, 64, 10000.0, kwargs.pop("scaling"), OPS, **kwargs)


def test_llama3_table_unchanged():
    """The Llama 3.1 path is the same table as before (build_rope_cache), row = position."""
    from lmforge.kernels.rope_cache import build_rope_cache

    llama31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}  # fmt: skip
    rotary = RotaryEmbedding(64, 512, 500000.0, llama31, OPS)
    assert torch.equal(rotary.cos_sin_cache, build_rope_cache(64, 512, 500000.0, llama31))
    positions = torch.tensor([0, 5, 511])
    rows, table = rotary.lookup(positions)
    assert rows is positions and table is rotary.cos_sin_cache
