"""Round-to-nearest: the error bound, scale rounding, and the fp8 helpers."""

from __future__ import annotations

import pytest
import torch

from lmforge.runtime.quantize import rtn


@pytest.mark.parametrize(
    "bits, group_size, dtype",
    [
        (4, 128, torch.float32),
        (4, 32, torch.float32),
        (4, 64, torch.bfloat16),
        (4, 128, torch.float16),
        (8, -1, torch.float32),
        (8, -1, torch.bfloat16),
        (8, 64, torch.float16),
    ],
    ids=lambda v: str(v),
)
def test_rtn_error_is_at_most_half_a_step(bits, group_size, dtype):
    g = torch.Generator().manual_seed(bits * 1000 + group_size)
    w = torch.randn(48, 256, generator=g) * torch.rand(48, 1, generator=g) * 0.1
    w[3, 5] = 1.5  # an outlier sets its group's scale
    w[7] = 0.0  # an all-zero row: scale stays positive, codes 0
    q, scale = rtn.rtn_int(w, bits, group_size, dtype)
    groups = 1 if group_size == -1 else 256 // group_size
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert scale.dtype == dtype and scale.shape == (48, groups)
    low, high = rtn.int_range(bits)
    assert int(q.min()) >= low and int(q.max()) <= high
    step = rtn.expand_scale(scale.double(), 256)
    error = (w.double() - q.double() * step).abs()  # float64: the bound is about the codes, not the product
    # up to the fp32 rounding of W / scale (|W / scale| <= 128: one ulp is 2^-16 of a step)
    assert bool((error <= step * (0.5 + 2**-16)).all()), float((error / step).max())
    assert bool((q[7] == 0).all()) and bool((scale > 0).all())
    # the stored W_hat is q * scale in the scale dtype, as every loader computes it
    assert torch.equal(rtn.dequantize_int(q, scale), q.to(dtype) * rtn.expand_scale(scale, 256))


def test_int4_uses_the_full_range_like_the_library():
    w = torch.tensor([[-7.5, -1.0, 0.0, 0.25, 1.0, 3.0, 7.0, 7.5]])
    q, scale = rtn.rtn_int(w, 4, -1, torch.float32)
    assert scale.item() == 1.0  # absmax / 7.5
    assert q.tolist() == [[-8, -1, 0, 0, 1, 3, 7, 7]]  # round half to even; +7.5 clamps to 7


def test_store_scale_never_rounds_down():
    exact = torch.rand(10000, generator=torch.Generator().manual_seed(0)) * 3 + 1e-3
    for dtype in (torch.bfloat16, torch.float16):
        stored = rtn.store_scale(exact, dtype)
        assert bool((stored.float() >= exact).all())
        assert bool((stored.float() <= exact * (1 + 2 * torch.finfo(dtype).eps)).all())  # at most one ulp up


def test_fp8_weights_and_token_activations():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 64, generator=g)
    w8, scale = rtn.quantize_fp8(w, torch.float32)
    assert w8.dtype == torch.float8_e4m3fn and scale.shape == (16, 1)
    assert torch.allclose(
        w8.float().abs().amax(-1), torch.full((16,), rtn.FP8_MAX)
    )  # each row's max hits 448
    assert torch.allclose(rtn.dequantize_fp8(w8, scale), w, rtol=2**-4, atol=0)  # e4m3: 3 mantissa bits
    x = torch.randn(5, 64, generator=g)
    x[2] = 0.0
    fq = rtn.fake_quant_fp8_tokens(x)
    assert fq.dtype == x.dtype and bool((fq[2] == 0).all())
    assert torch.allclose(fq, x, rtol=2**-4, atol=0)
