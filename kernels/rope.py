"""Rotary embedding (neox / HF rotate_half layout) on q and k in place, one program per token.

    x1, x2 = x[:R/2], x[R/2:R];  x1' = x1*cos - x2*sin;  x2' = x2*cos + x1*sin   (R = rotary dim)

cos/sin come from `rope_cache.build_rope_cache` (re-exported here with the Llama 3.1 frequency scaling).
Reference: `reference.rope`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rope_cache import build_rope_cache, compute_inv_freq

__all__ = ["build_rope_cache", "compute_inv_freq", "rope"]


@triton.jit
def _rotate_heads(x_ptr, stride_h, num_heads, cos, sin, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):
    """Rotates the first 2*HALF dims of num_heads rows x_ptr + h*stride_h (one token)."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_r = tl.arange(0, BLOCK_R)
    mask = (offs_h[:, None] < num_heads) & (offs_r[None, :] < HALF)
    ptrs = x_ptr + offs_h[:, None] * stride_h + offs_r[None, :]
    x1 = tl.load(ptrs, mask=mask, other=0.0)
    x2 = tl.load(ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    dtype = x1.dtype
    x1 = x1.to(tl.float32)
    tl.store(ptrs, (x1 * cos[None, :] - x2 * sin[None, :]).to(dtype), mask=mask)
    tl.store(ptrs + HALF, (x2 * cos[None, :] + x1 * sin[None, :]).to(dtype), mask=mask)


@triton.jit
def _rope_kernel(
    positions_ptr, q_ptr, k_ptr, cos_sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cs,
    num_q_heads, num_kv_heads,
    HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    cos = tl.load(cos_sin_ptr + pos * stride_cs + offs_r, mask=offs_r < HALF, other=0.0).to(tl.float32)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + offs_r, mask=offs_r < HALF, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr + token * stride_qt, stride_qh, num_q_heads, cos, sin, HALF, BLOCK_HQ, BLOCK_R)
    _rotate_heads(k_ptr + token * stride_kt, stride_kh, num_kv_heads, cos, sin, HALF, BLOCK_HK, BLOCK_R)


def rope(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] int; q [T, Hq, D], k [T, Hkv, D] (views of a fused qkv are fine: only the head dim
    must be contiguous); cos_sin_cache [max_pos, R] fp32, R <= D. Rotates in place, returns (q, k)."""
    num_tokens, num_q_heads, head_dim = q.shape
    assert k.dim() == 3 and k.shape[0] == num_tokens and k.shape[2] == head_dim, (q.shape, k.shape)
    assert positions.shape == (num_tokens,) and not positions.dtype.is_floating_point, positions.dtype
    assert q.stride(-1) == 1 and k.stride(-1) == 1, (q.stride(), k.stride())
    assert q.dtype == k.dtype, (q.dtype, k.dtype)
    rotary_dim = cos_sin_cache.shape[1]
    assert cos_sin_cache.dim() == 2 and cos_sin_cache.stride(1) == 1, cos_sin_cache.shape
    assert rotary_dim % 2 == 0 and rotary_dim <= head_dim, (rotary_dim, head_dim)
    half = rotary_dim // 2
    if num_tokens:
        _rope_kernel[(num_tokens,)](
            positions, q, k, cos_sin_cache,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
            num_q_heads, k.shape[1],
            HALF=half, BLOCK_HQ=triton.next_power_of_2(num_q_heads), BLOCK_HK=triton.next_power_of_2(k.shape[1]),
            BLOCK_R=triton.next_power_of_2(half),
        )  # fmt: skip
    return q, k
