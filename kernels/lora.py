"""Multi-LoRA shrink / expand kernels (punica's BGMV: one adapter slot per token, read from an index).

A batch mixes tokens of several adapters and of the base model. Every LoRA-wrapped linear adds
    y[t] += scale[s] * (x[t] @ A[s]^T) @ B[s]^T,    s = token_slots[t]  (-1: base model, nothing added)
in two steps, each one kernel launch over the whole batch:
    shrink  x [T, K] -> buf [T, R]   grid (T, cdiv(R, BLOCK_R)): a K loop of A-row tiles times x[t]
    expand  buf [T, R] -> y [T, N]   grid (T, cdiv(N, BLOCK_N)): B tile [BLOCK_N, R] times buf[t], added to y
The slot is loaded per token, so one launch serves any mix of adapters; a base-model token's program
returns at once. Ranks below the pool's R are zero-padded in A and B (zero contributions). Products
accumulate in fp32. Torch references: `reference.lora_shrink` / `reference.lora_expand`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, slots_ptr, out_ptr,
    R, K, stride_xt, stride_as, stride_ar, stride_ot,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    slot = tl.load(slots_ptr + t)
    if slot < 0:  # a base-model token: its row stays zero
        tl.store(out_ptr + t * stride_ot + offs_r, tl.zeros([BLOCK_R], dtype=tl.float32).to(
            out_ptr.dtype.element_ty), mask=mask_r)  # fmt: skip
        return
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    a_rows = a_ptr + slot.to(tl.int64) * stride_as + offs_r[:, None] * stride_ar
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + t * stride_xt + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        a = tl.load(a_rows + offs_k[None, :], mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        acc += a.to(tl.float32) * x[None, :]
    out = tl.sum(acc, axis=1)
    tl.store(out_ptr + t * stride_ot + offs_r, out.to(out_ptr.dtype.element_ty), mask=mask_r)


@triton.jit
def _expand_kernel(
    buf_ptr, b_ptr, slots_ptr, scales_ptr, y_ptr,
    N, R, stride_bt, stride_bs, stride_bn, stride_yt,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + t)
    if slot < 0:  # a base-model token: y is the base output
        return
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_n = offs_n < N
    mask_r = offs_r < R
    h = tl.load(buf_ptr + t * stride_bt + offs_r, mask=mask_r, other=0.0).to(tl.float32)
    b = tl.load(
        b_ptr + slot.to(tl.int64) * stride_bs + offs_n[:, None] * stride_bn + offs_r[None, :],
        mask=mask_n[:, None] & mask_r[None, :],
        other=0.0,
    )
    delta = tl.sum(b.to(tl.float32) * h[None, :], axis=1) * tl.load(scales_ptr + slot)
    y_ptrs = y_ptr + t * stride_yt + offs_n
    y = tl.load(y_ptrs, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + delta).to(y_ptr.dtype.element_ty), mask=mask_n)


def _check_slots(token_slots: torch.Tensor, num_tokens: int) -> None:
    assert token_slots.shape == (num_tokens,) and token_slots.dtype in (torch.int32, torch.int64), (
        token_slots.shape,
        token_slots.dtype,
    )


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """x [T, K] (last dim contiguous), lora_a [S, R, K] contiguous -> [T, R] in x.dtype."""
    T, K = x.shape
    S, R, Ka = lora_a.shape
    assert Ka == K and lora_a.is_contiguous() and x.stride(1) == 1, (lora_a.shape, x.shape, x.stride())
    _check_slots(token_slots, T)
    out = torch.empty(T, R, dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    block_r = min(triton.next_power_of_2(R), 16)
    block_k = 128 if x.is_cuda else 32
    _shrink_kernel[(T, triton.cdiv(R, block_r))](
        x, lora_a, token_slots, out,
        R, K, x.stride(0), lora_a.stride(0), lora_a.stride(1), out.stride(0),
        BLOCK_R=block_r, BLOCK_K=block_k, num_warps=4,
    )  # fmt: skip
    return out


def lora_expand(
    y: torch.Tensor,
    buf: torch.Tensor,
    lora_b: torch.Tensor,
    token_slots: torch.Tensor,
    scales: torch.Tensor,
) -> None:
    """y [T, N] (a view is fine: last dim contiguous) += per-slot scaled buf @ lora_b^T, in place;
    buf [T, R] (last dim contiguous), lora_b [S, N, R] contiguous, scales [S] fp32."""
    T, N = y.shape
    S, Nb, R = lora_b.shape
    assert Nb == N and buf.shape == (T, R) and lora_b.is_contiguous(), (y.shape, buf.shape, lora_b.shape)
    assert y.stride(1) == 1 and buf.stride(1) == 1, (y.stride(), buf.stride())
    assert scales.shape == (S,) and scales.dtype == torch.float32, (scales.shape, scales.dtype)
    _check_slots(token_slots, T)
    if T == 0:
        return
    block_n = 64 if y.is_cuda else 32
    _expand_kernel[(T, triton.cdiv(N, block_n))](
        buf, lora_b, token_slots, scales, y,
        N, R, buf.stride(0), lora_b.stride(0), lora_b.stride(1), y.stride(0),
        BLOCK_N=block_n, BLOCK_R=triton.next_power_of_2(R), num_warps=4,
    )  # fmt: skip
