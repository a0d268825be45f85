import pytest
import torch

from lmforge.kernels import reference
from lmforge.kernels.rmsnorm import fused_add_rms_norm, rms_norm

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}  # fmt: skip
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 16), (3, 33), (2, 3, 128), (5, 200)], ids=str)
def test_rms_norm_matches_reference(device, dtype, shape):
    x = torch.randn(shape, dtype=dtype, device=device) * 3
    w = torch.randn(shape[-1], dtype=dtype, device=device)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 16), (4, 48), (7, 130)], ids=str)
def test_fused_add_rms_norm_matches_reference(device, dtype, shape):
    x = torch.randn(shape, dtype=dtype, device=device)
    residual = torch.randn(shape, dtype=dtype, device=device)
    w = torch.rand(shape[-1], dtype=dtype, device=device) + 0.5
    out, new_residual = fused_add_rms_norm(x, residual, w, 1e-5)
    ref_out, ref_residual = reference.fused_add_rms_norm(x, residual, w, 1e-5)
    torch.testing.assert_close(
        new_residual, ref_residual, atol=0, rtol=0
    )  # one rounding of the same fp32 sum
    torch.testing.assert_close(out, ref_out, **TOL[dtype])


def test_rms_norm_strided_rows(device):
    """Rows of a wider buffer (e.g. a slice of a fused projection): only the last dim must be contiguous."""
    base = torch.randn(6, 96, device=device)
    x = base[:, :64]
    w = torch.randn(64, device=device)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6), atol=1e-5, rtol=1e-5)


def test_rms_norm_empty(device):
    x = torch.empty(0, 32, device=device)
    assert rms_norm(x, torch.ones(32, device=device), 1e-6).shape == (0, 32)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 17, 512])
def test_rms_norm_llama_sizes_gpu(num_tokens):
    x = torch.randn(num_tokens, 4096, dtype=torch.bfloat16, device="cuda")
    r = torch.randn_like(x)
    w = torch.randn(4096, dtype=torch.bfloat16, device="cuda")
    out, res = fused_add_rms_norm(x, r, w, 1e-5)
    ref_out, ref_res = reference.fused_add_rms_norm(x, r, w, 1e-5)
    torch.testing.assert_close(res, ref_res, atol=0, rtol=0)
    torch.testing.assert_close(out, ref_out, **TOL[torch.bfloat16])
