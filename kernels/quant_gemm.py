"""Weight-only W8A16 / W4A16 linear on compressed-tensors `pack-quantized` weights.

    y [M, N] = x [M, K] @ W^T,  W[n, k] = q[n, k] * weight_scale[n, k // group]   (rounded to x.dtype)
    weight_packed [N, K*bits/32] int32: element k of row n at bits [(k % (32/bits))*bits, +bits) of word
    k*bits//32, stored unsigned (q + 2^(bits-1)); weight_scale [N, K/group] (per-channel: [N, 1]).

Two kernels, both dequantizing a weight tile in registers right after loading it (the packed weights
are read from memory once, 4x/2x fewer bytes than bf16):
  M <= GEMV_MAX_M: GEMV, grid (cdiv(N, BLOCK_N), M), fp32 multiply-accumulate without tensor cores;
  larger M: tiled GEMM, grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)), tl.dot on the dequantized tile.
BLOCK_K divides the group size, so one scale per output column per K tile.
Pack/unpack helpers (torch) live in `quant_pack.py`; reference: `reference.quant_linear`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quant_pack import dequantize_weight, pack_int_weights, unpack_int_weights

__all__ = ["dequantize_weight", "pack_int_weights", "quant_linear", "unpack_int_weights"]

GEMV_MAX_M = 4


@triton.jit
def _dequant_tile(w_ptr, s_ptr, offs_n, offs_k, k0, stride_wn, stride_sn, group_size, BITS: tl.constexpr):
    """Weights of rows offs_n x columns offs_k (broadcastable, in bounds) -> fp32, rounded to the scale dtype."""
    PER_WORD: tl.constexpr = 32 // BITS
    words = tl.load(w_ptr + offs_n * stride_wn + offs_k // PER_WORD)
    u = (words >> ((offs_k % PER_WORD) * BITS)) & ((1 << BITS) - 1)
    q = (u - (1 << (BITS - 1))).to(tl.float32)
    scale = tl.load(s_ptr + offs_n * stride_sn + k0 // group_size)  # one group per K tile
    return (q * scale.to(tl.float32)).to(s_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, s_ptr, bias_ptr, y_ptr,
    N, K, stride_xm, stride_wn, stride_sn, stride_ym, group_size,
    BITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.program_id(1).to(tl.int64)
    mask_n = offs_n < N
    safe_n = tl.where(mask_n, offs_n, 0)[:, None]  # out-of-range rows read row 0, never stored
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m * stride_xm + offs_k).to(tl.float32)  # K % BLOCK_K == 0
        w = _dequant_tile(w_ptr, s_ptr, safe_n, offs_k[None, :], k0, stride_wn, stride_sn, group_size, BITS)
        acc += w * x[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _gemm_kernel(
    x_ptr, w_ptr, s_ptr, bias_ptr, y_ptr,
    M, N, K, stride_xm, stride_wn, stride_sn, stride_ym, group_size,
    BITS: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    safe_n = tl.where(mask_n, offs_n, 0)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
            mask=mask_m[:, None],
            other=0.0,
        )
        w = _dequant_tile(w_ptr, s_ptr, safe_n, offs_k[:, None], k0, stride_wn, stride_sn, group_size, BITS)
        acc += tl.dot(x, w.to(x.dtype), input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _block_k(group_size: int, cap: int) -> int:
    """Largest power of two <= cap dividing group_size (group_size divides K)."""
    block = 1
    while block * 2 <= cap and group_size % (block * 2) == 0:
        block *= 2
    return block


def quant_linear(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    bits: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] (fp16/bf16/fp32, last dim contiguous) -> [..., N] in x.dtype."""
    assert bits in (4, 8), f"bits must be 4 or 8, got {bits}"
    K = x.shape[-1]
    N = weight_packed.shape[0]
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32) and x.stride(-1) == 1, (
        x.dtype,
        x.stride(),
    )
    assert weight_packed.dtype == torch.int32 and weight_packed.is_contiguous(), weight_packed.dtype
    assert weight_packed.shape == (N, K * bits // 32) and K * bits % 32 == 0, (weight_packed.shape, K, bits)
    assert weight_scale.dim() == 2 and weight_scale.shape[0] == N and K % weight_scale.shape[1] == 0, (
        weight_scale.shape
    )
    assert weight_scale.dtype == x.dtype and weight_scale.stride(1) == 1, (weight_scale.dtype, x.dtype)
    assert bias is None or (bias.shape == (N,) and bias.is_contiguous()), bias
    group_size = K // weight_scale.shape[1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y.view(*x.shape[:-1], N)
    bias_arg = bias if bias is not None else y
    if M <= GEMV_MAX_M:
        block_n = 8 if x.is_cuda else 16
        block_k = _block_k(group_size, 256 if x.is_cuda else 64)
        _gemv_kernel[(triton.cdiv(N, block_n), M)](
            x2, weight_packed, weight_scale, bias_arg, y,
            N, K, x2.stride(0), weight_packed.stride(0), weight_scale.stride(0), y.stride(0), group_size,
            BITS=bits, HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
        )  # fmt: skip
    else:
        block_m = 16 if M <= 16 or not x.is_cuda else (32 if M <= 32 else 64)
        block_n = 64 if x.is_cuda else 16
        block_k = _block_k(group_size, 64 if x.is_cuda else 32)
        assert block_k >= 16, f"group size {group_size} too small for the GEMM tile"
        grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
        _gemm_kernel[grid](
            x2, weight_packed, weight_scale, bias_arg, y,
            M, N, K, x2.stride(0), weight_packed.stride(0), weight_scale.stride(0), y.stride(0), group_size,
            BITS=bits, HAS_BIAS=bias is not None, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=3,
        )  # fmt: skip
    return y.view(*x.shape[:-1], N)
