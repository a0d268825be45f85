import pytest
import torch

from lmforge.kernels import reference
from lmforge.kernels.kv_cache import reshape_and_cache, reshape_and_cache_int8


def _slots(num_tokens, num_blocks, block_size, device, num_padding=0):
    """Distinct random slots across blocks, with num_padding entries set to -1."""
    slots = torch.randperm(num_blocks * block_size, device=device)[:num_tokens]
    slots[torch.randperm(num_tokens, device=device)[:num_padding]] = -1
    return slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "num_tokens,num_kv_heads,head_dim,block_size,num_padding",
    [(1, 1, 16, 16, 0), (7, 2, 32, 16, 2), (17, 8, 24, 8, 3)],
    ids=["one-token", "padded", "odd-head-dim"],
)
def test_reshape_and_cache_matches_reference(
    device, dtype, num_tokens, num_kv_heads, head_dim, block_size, num_padding
):
    num_blocks = 5
    key = torch.randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, device=device)
    value = torch.randn_like(key)
    slots = _slots(num_tokens, num_blocks, block_size, device, num_padding)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = (
        torch.randn(shape, dtype=dtype, device=device),
        torch.randn(shape, dtype=dtype, device=device),
    )
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    reshape_and_cache(key, value, k_cache, v_cache, slots)
    reference.reshape_and_cache(key, value, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)  # a copy: bit-exact, padding untouched


def test_reshape_and_cache_from_fused_qkv_view_with_cast(device):
    """key/value as head views of a qkv buffer (token stride > Hkv*D), fp32 activations into a bf16 cache."""
    t, hkv, d = 5, 2, 16
    qkv = torch.randn(t, 3 * hkv * d, device=device)
    key = qkv[:, hkv * d : 2 * hkv * d].view(t, hkv, d)
    value = qkv[:, 2 * hkv * d :].view(t, hkv, d)
    shape = (3, 4, hkv, d)
    k_cache = torch.zeros(shape, dtype=torch.bfloat16, device=device)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([0, 5, 11, -1, 4], device=device)
    reshape_and_cache(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache.view(-1, hkv, d)[5], key[1].to(torch.bfloat16))  # RNE rounding, as torch
    k_ref, v_ref = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    reference.reshape_and_cache(key, value, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_tokens,num_kv_heads,head_dim", [(3, 1, 16), (9, 4, 32), (6, 2, 40)])
def test_reshape_and_cache_int8_matches_reference(device, dtype, num_tokens, num_kv_heads, head_dim):
    num_blocks, block_size = 4, 8
    key = torch.randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, device=device) * 3
    value = torch.randn_like(key)
    value[0, 0] = 0  # an all-zero token-head: scale 0, codes 0
    slots = _slots(num_tokens, num_blocks, block_size, device, num_padding=1)
    caches = [
        torch.zeros(num_blocks, block_size, num_kv_heads, head_dim, dtype=torch.int8, device=device)
        for _ in "kv"
    ]
    scales = [torch.full((num_blocks, block_size, num_kv_heads), -1.0, device=device) for _ in "kv"]
    ref_caches = [c.clone() for c in caches]
    ref_scales = [s.clone() for s in scales]
    reshape_and_cache_int8(key, value, *caches, *scales, slots)
    reference.reshape_and_cache_int8(key, value, *ref_caches, *ref_scales, slots)
    for got, want in zip(scales, ref_scales, strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=1e-6)
    for got, want in zip(
        caches, ref_caches, strict=True
    ):  # GPU fp32 division may flip a code at an exact .5 tie
        assert (got.int() - want.int()).abs().max() <= 1
        assert (got != want).float().mean() < 0.01


def test_int8_quantization_error_is_half_a_step():
    x = torch.randn(50, 4, 64) * 5
    codes, scale = reference.quantize_int8(x)
    assert codes.abs().max() == 127
    err = (codes.float() * scale[..., None] - x).abs()
    assert (err <= scale[..., None] / 2 + 1e-6).all()


@pytest.mark.gpu
def test_reshape_and_cache_llama_sizes_gpu():
    key = torch.randn(512, 8, 128, dtype=torch.bfloat16, device="cuda")
    value = torch.randn_like(key)
    shape = (64, 16, 8, 128)
    k_cache, v_cache = (
        torch.zeros(shape, dtype=torch.bfloat16, device="cuda"),
        torch.zeros(shape, dtype=torch.bfloat16, device="cuda"),
    )
    slots = _slots(512, 64, 16, "cuda", num_padding=10)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    reshape_and_cache(key, value, k_cache, v_cache, slots)
    reference.reshape_and_cache(key, value, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
