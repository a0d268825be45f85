import pytest
import torch

from lmforge.kernels import reference
from lmforge.kernels.activation import silu_and_mul

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}  # fmt: skip


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("shape", [(1, 32), (3, 2 * 37), (2, 2, 2 * 64), (5, 2 * 1100)], ids=str)
def test_silu_and_mul_matches_reference(device, dtype, shape):
    x = torch.randn(shape, dtype=dtype, device=device) * 4
    out = silu_and_mul(x)
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == dtype
    torch.testing.assert_close(out, reference.silu_and_mul(x), **TOL[dtype])


def test_reference_is_the_llama_mlp_gate():
    x = torch.randn(4, 2 * 8, dtype=torch.float64)
    gate, up = x[:, :8], x[:, 8:]
    torch.testing.assert_close(reference.silu_and_mul(x), gate * torch.sigmoid(gate) * up)


@pytest.mark.gpu
def test_silu_and_mul_llama_sizes_gpu():
    x = torch.randn(64, 2 * 14336, dtype=torch.bfloat16, device="cuda")
    torch.testing.assert_close(silu_and_mul(x), reference.silu_and_mul(x), **TOL[torch.bfloat16])
