import math

import pytest
import torch

from lmforge.kernels import reference
from lmforge.kernels.rope import build_rope_cache, compute_inv_freq, rope

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}  # fmt: skip
LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}  # fmt: skip


@pytest.mark.parametrize("is_neox_style", [True, False], ids=["neox", "interleaved"])
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize(
    "num_tokens,num_q_heads,num_kv_heads,head_dim,rotary_dim",
    [(1, 4, 4, 16, 16), (5, 8, 2, 32, 32), (7, 8, 1, 64, 64), (3, 6, 2, 32, 16), (2, 2, 1, 40, 10)],
    ids=["mha", "gqa4", "gqa8", "partial-rotary", "partial-odd-half"],
)
def test_rope_matches_reference(device, dtype, is_neox_style, num_tokens, num_q_heads, num_kv_heads, head_dim,
                                rotary_dim):  # fmt: skip
    cache = build_rope_cache(rotary_dim, 64, 10000.0, device=device)
    positions = torch.randint(0, 64, (num_tokens,), device=device)
    q = torch.randn(num_tokens, num_q_heads, head_dim, dtype=dtype, device=device)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, device=device)
    q_before = q.clone()
    q_ref, k_ref = reference.rope(positions, q.clone(), k.clone(), cache, is_neox_style)
    q_out, k_out = rope(positions, q, k, cache, is_neox_style)
    assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()  # in place
    torch.testing.assert_close(q, q_ref, **TOL[dtype])
    torch.testing.assert_close(k, k_ref, **TOL[dtype])
    assert torch.equal(
        q[..., rotary_dim:], q_before[..., rotary_dim:]
    )  # partial rotary: the rest passes through


def test_interleaved_reference_matches_hf_glm():
    """is_neox_style=False equals GLM's apply_rotary_pos_emb (pairs (2i, 2i+1), partial rotary)."""
    from transformers.models.glm.modeling_glm import apply_rotary_pos_emb

    d, r, base = 16, 8, 10000.0
    positions = torch.tensor([0, 2, 11])
    q = torch.randn(3, 2, d, dtype=torch.float64)
    k = torch.randn(3, 1, d, dtype=torch.float64)
    inv_freq = 1.0 / base ** (torch.arange(0, r, 2, dtype=torch.float64) / r)
    emb = torch.cat([torch.outer(positions.double(), inv_freq)] * 2, dim=-1)[None]  # [1, T, R] as HF's rotary
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], emb.cos(), emb.sin())
    cache = build_rope_cache(r, 12, base).double()
    q_out, k_out = reference.rope(positions, q.clone(), k.clone(), cache, is_neox_style=False)
    torch.testing.assert_close(q_out, q_hf[0].transpose(0, 1))
    torch.testing.assert_close(k_out, k_hf[0].transpose(0, 1))
    q_neox, _ = reference.rope(positions, q.clone(), k.clone(), cache)
    assert not torch.allclose(q_neox, q_out)  # the layouts really differ


@pytest.mark.parametrize("rope_type", ["longrope", "dynamic", "yarn"])
def test_rotary_embedding_triton_matches_torch(device, rope_type):
    """The layer on the Triton backend (row tables for longrope, per-token cos/sin for dynamic) equals the
    torch backend, interleaved and partial included."""
    from lmforge.kernels.backend import get_ops
    from lmforge.runtime.models.layers import RotaryEmbedding

    scaling = {
        "longrope": {"rope_type": "longrope", "original_max_position_embeddings": 16,
                     "short_factor": [1.0, 1.1, 1.2, 1.3], "long_factor": [1.0, 2.0, 4.0, 8.0]},
        "dynamic": {"rope_type": "dynamic", "factor": 2.0},
        "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    }[rope_type]  # fmt: skip
    positions = torch.tensor([0, 5, 20, 40, 3, 17], device=device)
    prompt_lens = torch.tensor([30, 30, 30, 30, 4, 4], device=device)
    q = torch.randn(6, 4, 16, device=device)
    k = torch.randn(6, 2, 16, device=device)
    outs = []
    for backend in ("torch", "triton"):
        layer = RotaryEmbedding(16, 48, 10000.0, scaling, get_ops(device, backend), rotary_dim=8,
                                is_neox_style=False, max_position_embeddings=16).to(device)  # fmt: skip
        qb, kb = q.clone(), k.clone()
        layer(positions, qb, kb, prompt_lens)
        outs.append((qb, kb))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[1][1], outs[0][1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(outs[0][0], q)


def test_rope_on_views_of_fused_qkv(device):
    """q and k as column views of one [T, (Hq + 2*Hkv) * D] projection output, int32 positions."""
    num_tokens, hq, hkv, d = 4, 4, 2, 16
    qkv = torch.randn(num_tokens, (hq + 2 * hkv) * d, device=device)
    q = qkv[:, : hq * d].view(num_tokens, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(num_tokens, hkv, d)
    v_before = qkv[:, (hq + hkv) * d :].clone()
    cache = build_rope_cache(d, 32, 500000.0, LLAMA31, device=device)
    positions = torch.tensor([0, 3, 17, 31], dtype=torch.int32, device=device)
    q_ref, k_ref = reference.rope(positions, q.clone(), k.clone(), cache)
    rope(positions, q, k, cache)
    torch.testing.assert_close(q, q_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(qkv[:, (hq + hkv) * d :], v_before)


def test_reference_matches_hf_rotate_half():
    """The reference equals HF's q * cos + rotate_half(q) * sin with cos/sin = cat(freqs, freqs)."""
    d, base = 16, 10000.0
    positions = torch.tensor([0, 1, 9])
    q = torch.randn(3, 2, d, dtype=torch.float64)
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    emb = torch.cat([torch.outer(positions.double(), inv_freq)] * 2, dim=-1)[:, None, :]
    rotate_half = torch.cat([-q[..., d // 2 :], q[..., : d // 2]], dim=-1)
    expected = q * emb.cos() + rotate_half * emb.sin()
    out, _ = reference.rope(positions, q.clone(), q[:, :1].clone(), build_rope_cache(d, 10, base).double())
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize(
    "scaling",
    [
        None,
        {"rope_type": "linear", "factor": 4.0},
        LLAMA31,
        {**LLAMA31, "factor": 32.0, "high_freq_factor": 2.0},
    ],
    ids=["default", "linear", "llama3.1", "llama3-other-factors"],
)
@pytest.mark.parametrize("head_dim,theta", [(64, 10000.0), (128, 500000.0)])
def test_inv_freq_bit_identical_to_transformers(scaling, head_dim, theta):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    params = {"rope_type": "default", "rope_theta": theta, **(scaling or {})}
    config = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                         max_position_embeddings=131072, rope_parameters=params)  # fmt: skip
    expected = LlamaRotaryEmbedding(config=config).inv_freq
    assert torch.equal(compute_inv_freq(head_dim, theta, scaling), expected)


def test_llama3_scaling_regions():
    """High frequencies untouched, low ones divided by factor, the band between blended."""
    inv = compute_inv_freq(128, 500000.0)
    scaled = compute_inv_freq(128, 500000.0, LLAMA31)
    wavelen = 2 * math.pi / inv
    high = wavelen < 8192 / 4
    low = wavelen > 8192 / 1
    assert torch.equal(scaled[high], inv[high])
    assert torch.equal(scaled[low], inv[low] / 8)
    mid = ~high & ~low
    assert mid.any() and ((scaled[mid] < inv[mid]) & (scaled[mid] > inv[mid] / 8)).all()


def test_cache_layout():
    cache = build_rope_cache(8, 5, 100.0)
    inv = compute_inv_freq(8, 100.0)
    assert cache.shape == (5, 8) and cache.dtype == torch.float32
    torch.testing.assert_close(cache[3, :4], torch.cos(3 * inv))
    torch.testing.assert_close(cache[3, 4:], torch.sin(3 * inv))
    with pytest.raises(ValueError, match="rope_type 'mrope'"):
        compute_inv_freq(8, 100.0, {"rope_type": "mrope", "factor": 2.0})


@pytest.mark.gpu
def test_rope_llama_sizes_gpu():
    cache = build_rope_cache(128, 8192, 500000.0, LLAMA31, device="cuda")
    positions = torch.randint(0, 8192, (300,), device="cuda")
    q = torch.randn(300, 32, 128, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(300, 8, 128, dtype=torch.bfloat16, device="cuda")
    q_ref, k_ref = reference.rope(positions, q.clone(), k.clone(), cache)
    rope(positions, q, k, cache)
    torch.testing.assert_close(q, q_ref, **TOL[torch.bfloat16])
    torch.testing.assert_close(k, k_ref, **TOL[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.parametrize("rope_type", ["longrope", "dynamic"])
def test_length_dependent_rope_replays_in_a_cuda_graph(rope_type):
    """The longrope row choice and the dynamic per-token table run inside a captured graph (no host sync,
    static shapes): a replay with new positions / prompt lengths equals the eager layer."""
    from lmforge.kernels.backend import get_ops
    from lmforge.runtime.models.layers import RotaryEmbedding

    n = 64
    scaling = {
        "longrope": {"rope_type": "longrope", "original_max_position_embeddings": 1024,
                     "short_factor": [1.0 + i / 100 for i in range(32)], "long_factor": [1.0 + i for i in range(32)]},
        "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    }[rope_type]  # fmt: skip
    layer = RotaryEmbedding(128, 8192, 10000.0, scaling, get_ops("cuda"), rotary_dim=64, is_neox_style=False,
                            max_position_embeddings=1024).cuda()  # fmt: skip
    positions = torch.zeros(n, dtype=torch.int32, device="cuda")
    prompt_lens = torch.zeros(n, dtype=torch.int32, device="cuda")
    q = torch.randn(n, 32, 128, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(n, 8, 128, dtype=torch.bfloat16, device="cuda")
    layer(positions, q, k, prompt_lens)  # warm up (Triton compiles outside the capture)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        layer(positions, q, k, prompt_lens)
    new_pos = torch.randint(0, 8192, (n,), device="cuda", dtype=torch.int32)
    new_prompt = torch.randint(1, 8192, (n,), device="cuda", dtype=torch.int32)
    q0, k0 = torch.randn_like(q), torch.randn_like(k)
    positions.copy_(new_pos)
    prompt_lens.copy_(new_prompt)
    q.copy_(q0)
    k.copy_(k0)
    graph.replay()
    q_ref, k_ref = q0.clone(), k0.clone()
    layer(new_pos, q_ref, k_ref, new_prompt)
    torch.testing.assert_close(q, q_ref, atol=0, rtol=0)
    torch.testing.assert_close(k, k_ref, atol=0, rtol=0)
