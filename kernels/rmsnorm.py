"""RMSNorm and fused residual-add + RMSNorm: one program per row (hidden <= 64K fits one tile).

Reference: `reference.rms_norm`, `reference.fused_add_rms_norm` (HF Llama numerics: fp32 statistics,
normalized value rounded to the input dtype before the weight multiply; the residual sum is rounded
to the input dtype before it is normalized and returned).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    stride_x, stride_r, stride_o, stride_ro,
    hidden, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    dtype = x.dtype
    h = x.to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        summed = (h + r).to(dtype)  # the residual stream keeps the model dtype
        tl.store(residual_out_ptr + row * stride_ro + offs, summed, mask=mask)
        h = summed.to(tl.float32)
    variance = tl.sum(h * h, axis=0) / hidden
    normed = (h * tl.rsqrt(variance + eps)).to(dtype).to(tl.float32)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (normed * w).to(dtype), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    assert x.stride(-1) == 1, f"last dim must be contiguous, strides {x.stride()}"
    return x.reshape(-1, x.shape[-1])  # a view whenever the leading dims are collapsible


def _launch(x, residual, weight, eps):
    hidden = x.shape[-1]
    assert weight.shape == (hidden,) and weight.is_contiguous(), (
        f"weight {tuple(weight.shape)} vs hidden {hidden}"
    )
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32), x.dtype
    x2 = _rows(x)
    out = torch.empty_like(x2)
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype, (residual.shape, residual.dtype)
        r2 = _rows(residual)
        residual_out = torch.empty_like(x2)
    else:
        r2 = residual_out = x2  # unused
    block = triton.next_power_of_2(hidden)
    num_warps = min(max(block // 256, 1), 16)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, out, residual_out,
            x2.stride(0), r2.stride(0), out.stride(0), residual_out.stride(0),
            hidden, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=num_warps,
        )  # fmt: skip
    return out.view(x.shape), residual_out.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., H], weight [H] -> [..., H] in x.dtype."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual), one read of each input, fresh outputs."""
    return _launch(x, residual, weight, eps)
