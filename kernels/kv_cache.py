"""Reshape-and-cache: scatter this step's key/value [T, Hkv, D] into the paged KV cache by slot.

    k_cache, v_cache [num_blocks, block_size, Hkv, D] (contiguous), slot = block_id * block_size + offset,
    slot -1 = padding (skipped). One program per token writes all its heads.

INT8 variant: symmetric per-(token, head) codes, scale = absmax / 127 kept in
k_scale_cache / v_scale_cache [num_blocks, block_size, Hkv] fp32; the attention kernels dequantize.
Reference: `reference.reshape_and_cache`, `reference.reshape_and_cache_int8`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _quantize_int8(x):
    """x [H, D] fp32 -> (codes [H, D] int8, scale [H] fp32); round half away from zero."""
    absmax = tl.max(tl.abs(x), axis=1)
    inv = tl.where(absmax > 0, 127.0 / tl.where(absmax > 0, absmax, 1.0), 0.0)
    y = x * inv[:, None]
    y = tl.minimum(tl.maximum(y + tl.where(y >= 0, 0.5, -0.5), -127.0), 127.0)
    return y.to(tl.int8), absmax / 127.0  # fp -> int truncates toward zero


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    num_kv_heads,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, INT8: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_h[:, None] < num_kv_heads) & (offs_d[None, :] < HEAD_DIM)
        src = offs_h[:, None] * stride_kh + offs_d[None, :]
        dst = slot * num_kv_heads * HEAD_DIM + offs_h[:, None] * HEAD_DIM + offs_d[None, :]
        k = tl.load(key_ptr + token * stride_kt + src, mask=mask, other=0.0)
        src_v = offs_h[:, None] * stride_vh + offs_d[None, :]
        v = tl.load(value_ptr + token * stride_vt + src_v, mask=mask, other=0.0)
        if INT8:
            k_codes, k_scale = _quantize_int8(k.to(tl.float32))
            v_codes, v_scale = _quantize_int8(v.to(tl.float32))
            tl.store(k_cache_ptr + dst, k_codes, mask=mask)
            tl.store(v_cache_ptr + dst, v_codes, mask=mask)
            mask_h = offs_h < num_kv_heads
            tl.store(k_scale_ptr + slot * num_kv_heads + offs_h, k_scale, mask=mask_h)
            tl.store(v_scale_ptr + slot * num_kv_heads + offs_h, v_scale, mask=mask_h)
        else:
            # fp32 first: the Triton interpreter cannot convert bf16 <-> fp16 directly.
            tl.store(k_cache_ptr + dst, k.to(tl.float32).to(k_cache_ptr.dtype.element_ty), mask=mask)
            tl.store(v_cache_ptr + dst, v.to(tl.float32).to(v_cache_ptr.dtype.element_ty), mask=mask)


def _check(key, value, k_cache, v_cache, slot_mapping):
    num_tokens, num_kv_heads, head_dim = key.shape
    assert value.shape == key.shape, (key.shape, value.shape)
    assert k_cache.dim() == 4 and k_cache.shape[2:] == (num_kv_heads, head_dim), (k_cache.shape, key.shape)
    assert v_cache.shape == k_cache.shape and v_cache.dtype == k_cache.dtype, (v_cache.shape, v_cache.dtype)
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "KV caches must be contiguous"
    assert key.stride(-1) == 1 and value.stride(-1) == 1, (key.stride(), value.stride())
    assert slot_mapping.shape == (num_tokens,) and not slot_mapping.dtype.is_floating_point, (
        slot_mapping.dtype
    )
    assert key.device == k_cache.device == slot_mapping.device, (
        key.device,
        k_cache.device,
        slot_mapping.device,
    )


def _launch(key, value, k_cache, v_cache, k_scale, v_scale, slot_mapping, int8):
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    _reshape_and_cache_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, k_scale, v_scale, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        num_kv_heads,
        HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim), INT8=int8,
    )  # fmt: skip


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """key, value [T, Hkv, D] (any float dtype; cast to the cache dtype) -> caches at slot_mapping [T]."""
    _check(key, value, k_cache, v_cache, slot_mapping)
    assert k_cache.dtype in (torch.float16, torch.bfloat16, torch.float32), k_cache.dtype
    _launch(key, value, k_cache, v_cache, k_cache, v_cache, slot_mapping, False)


def reshape_and_cache_int8(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale_cache: torch.Tensor,
    v_scale_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Quantizes key, value [T, Hkv, D] to int8 caches + fp32 scale caches [num_blocks, block_size, Hkv]."""
    _check(key, value, k_cache, v_cache, slot_mapping)
    assert k_cache.dtype == torch.int8, k_cache.dtype
    for scale_cache in (k_scale_cache, v_scale_cache):
        assert scale_cache.shape == k_cache.shape[:3] and scale_cache.dtype == torch.float32, (
            scale_cache.shape
        )
        assert scale_cache.is_contiguous()
    _launch(key, value, k_cache, v_cache, k_scale_cache, v_scale_cache, slot_mapping, True)
