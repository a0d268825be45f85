"""Rotary embedding on q and k in place, one program per token; dims past the rotary dim R pass through.

    pair i = (a, b):  a' = a*cos_i - b*sin_i;  b' = b*cos_i + a*sin_i
    neox / HF rotate_half layout (is_neox_style=True):  a = x[i], b = x[i + R/2]
    interleaved GPT-J layout (is_neox_style=False):     a = x[2i], b = x[2i + 1]   (GLM, GPT-J, Cohere)

cos/sin rows come from `rope_cache` (`build_rope_cache` re-exported here; the row of each token is
`positions`, which for the sequence-length-dependent rope types is a computed row index).
Reference: `reference.rope`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rope_cache import build_rope_cache, compute_inv_freq

__all__ = ["build_rope_cache", "compute_inv_freq", "rope"]  # the tables re-exported for older imports


@triton.jit
def _rotate_heads(x_ptr, stride_h, num_heads, cos, sin, HALF: tl.constexpr, IS_NEOX: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr):  # fmt: skip
    """Rotates the first 2*HALF dims of num_heads rows x_ptr + h*stride_h (one token)."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_r = tl.arange(0, BLOCK_R)
    mask = (offs_h[:, None] < num_heads) & (offs_r[None, :] < HALF)
    if IS_NEOX:
        a_ptrs = x_ptr + offs_h[:, None] * stride_h + offs_r[None, :]
        b_ptrs = a_ptrs + HALF
    else:
        a_ptrs = x_ptr + offs_h[:, None] * stride_h + 2 * offs_r[None, :]
        b_ptrs = a_ptrs + 1
    a = tl.load(a_ptrs, mask=mask, other=0.0)
    b = tl.load(b_ptrs, mask=mask, other=0.0).to(tl.float32)
    dtype = a.dtype
    a = a.to(tl.float32)
    tl.store(a_ptrs, (a * cos[None, :] - b * sin[None, :]).to(dtype), mask=mask)
    tl.store(b_ptrs, (b * cos[None, :] + a * sin[None, :]).to(dtype), mask=mask)


@triton.jit
def _rope_kernel(
    positions_ptr, q_ptr, k_ptr, cos_sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cs,
    num_q_heads, num_kv_heads,
    HALF: tl.constexpr, IS_NEOX: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    BLOCK_R: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    cos = tl.load(cos_sin_ptr + pos * stride_cs + offs_r, mask=offs_r < HALF, other=0.0).to(tl.float32)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + offs_r, mask=offs_r < HALF, other=0.0).to(tl.float32)
    _rotate_heads(
        q_ptr + token * stride_qt, stride_qh, num_q_heads, cos, sin, HALF, IS_NEOX, BLOCK_HQ, BLOCK_R
    )
    _rotate_heads(
        k_ptr + token * stride_kt, stride_kh, num_kv_heads, cos, sin, HALF, IS_NEOX, BLOCK_HK, BLOCK_R
    )


def rope(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox_style: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] int (row of cos_sin_cache per token); q [T, Hq, D], k [T, Hkv, D] (views of a fused
    qkv are fine: only the head dim must be contiguous); cos_sin_cache [rows, R] fp32, R <= D.
    Rotates in place, returns (q, k)."""
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
            HALF=half, IS_NEOX=bool(is_neox_style), BLOCK_HQ=triton.next_power_of_2(num_q_heads), BLOCK_HK=triton.next_power_of_2(k.shape[1]),
            BLOCK_R=triton.next_power_of_2(half),
        )  # fmt: skip
    return q, k
