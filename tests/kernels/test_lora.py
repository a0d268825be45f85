"""The multi-LoRA shrink / expand kernels against their torch references (interpreter on CPU)."""

import pytest
import torch

from lmforge.kernels import reference
from lmforge.kernels.lora import lora_expand, lora_shrink

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}


def _slots(num_tokens: int, num_slots: int, device: str) -> torch.Tensor:
    """Every slot and the base model (-1) appear, in an interleaved (not sorted) order."""
    slots = torch.arange(num_tokens) % (num_slots + 1) - 1
    return slots[torch.randperm(num_tokens)].to(torch.int32).to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens,k,rank", [(7, 48, 8), (3, 40, 16), (4, 64, 5)])
def test_shrink_matches_reference(device, dtype, num_tokens, k, rank):
    x = torch.randn(num_tokens, k, device=device).to(dtype)
    lora_a = torch.randn(3, rank, k, device=device).to(dtype)
    slots = _slots(num_tokens, 3, device)
    got = lora_shrink(x, lora_a, slots)
    want = reference.lora_shrink(x, lora_a, slots)
    torch.testing.assert_close(got, want, **TOL[dtype])
    assert torch.all(got[slots < 0] == 0)
    assert got[slots >= 0].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens,n,rank", [(7, 40, 8), (3, 72, 16), (5, 8, 3)])
def test_expand_matches_reference_on_a_column_slice(device, dtype, num_tokens, n, rank):
    """The output is a column slice of a fused projection (q of qkv): only those columns change."""
    fused = torch.randn(num_tokens, n + 24, device=device).to(dtype)
    buf = torch.randn(num_tokens, rank, device=device).to(dtype)
    lora_b = torch.randn(3, n, rank, device=device).to(dtype)
    scales = torch.tensor([0.5, 2.0, -1.25], device=device)
    slots = _slots(num_tokens, 3, device)
    got, want = fused.clone(), fused.clone()
    lora_expand(got[:, 8 : 8 + n], buf, lora_b, slots, scales)
    reference.lora_expand(want[:, 8 : 8 + n], buf, lora_b, slots, scales)
    torch.testing.assert_close(got, want, **TOL[dtype])
    assert torch.equal(got[:, :8], fused[:, :8]) and torch.equal(got[:, 8 + n :], fused[:, 8 + n :])
    assert torch.equal(got[slots < 0], fused[slots < 0])  # base-model rows untouched


def test_reference_is_the_per_row_lora_formula():
    """The reference itself against y + s * x A^T B^T written row by row (no gather tricks)."""
    x, a, b = torch.randn(5, 12), torch.randn(2, 4, 12), torch.randn(2, 6, 4)
    scales, slots = torch.tensor([0.5, 3.0]), torch.tensor([1, -1, 0, 1, 0])
    y = torch.randn(5, 6)
    got = y.clone()
    reference.lora_expand(got, reference.lora_shrink(x, a, slots), b, slots, scales)
    for t, s in enumerate(slots.tolist()):
        want = y[t] if s < 0 else y[t] + scales[s] * (b[s] @ (a[s] @ x[t]))
        torch.testing.assert_close(got[t], want)
