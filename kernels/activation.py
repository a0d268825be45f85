"""SiLU-and-mul (the Llama MLP gate): [..., 2I] -> silu(x[..., :I]) * x[..., I:], fp32 math, one rounding.

Reference: `reference.silu_and_mul`. Grid: (rows, cdiv(I, BLOCK)).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + inter + offs, mask=mask, other=0.0).to(tl.float32)
    g = gate.to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (g * tl.sigmoid(g) * up).to(gate.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2I] (last dim contiguous) -> [..., I] in x.dtype."""
    assert x.shape[-1] % 2 == 0 and x.stride(-1) == 1, f"shape {tuple(x.shape)} strides {x.stride()}"
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.empty(x2.shape[0], inter, dtype=x.dtype, device=x.device)
    block = min(triton.next_power_of_2(inter), 1024)
    if x2.shape[0]:
        grid = (x2.shape[0], triton.cdiv(inter, block))
        _silu_and_mul_kernel[grid](x2, out, x2.stride(0), out.stride(0), inter, BLOCK=block)
    return out.view(*x.shape[:-1], inter)
