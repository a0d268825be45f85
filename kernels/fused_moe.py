"""Fused mixture-of-experts: one grouped GEMM per projection over all experts (the serving engines' design).

    1. align  the T*k (token, slot) pairs are sorted by expert and each expert's run is padded to a
              multiple of BLOCK_M (`align_by_expert`, torch, on the device, no host sync): sorted_ids
              [L] holds flat pair indices t*k + j (padding: T*k), block_experts [L / BLOCK_M] the expert
              of each BLOCK_M-row block (-1: a block past the last expert's run, skipped)
    2. GEMM 1 grid (blocks, cdiv(2I, BLOCK_N)): each program multiplies BLOCK_M gathered token rows by one
              expert's w13 tile, [T*k, 2I] out, row = pair index
    3. act    silu(gate) * up (or another act), [T*k, I]
    4. GEMM 2 the same kernel over w2 with A's rows = pair indices, each row scaled by its routing weight
    5. combine the k rows of a token are summed: [T, k, H] -> [T, H]
So each expert's weights stream through once per step whatever the number of tokens it got, and an
expert no token chose costs nothing. Reference: `moe_reference.fused_moe` (loop over experts).

Splitting for tensor parallelism later needs nothing here: a rank holding experts [a, b) passes its slice
of w13/w2 and topk_ids - a masked to -1 outside (pairs with id -1 are dropped by `align_by_expert`); a rank
holding an intermediate slice passes w13/w2 cut on I and all-reduces the result.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import act_and_mul

BLOCK_M = 16


def align_by_expert(
    topk_ids: torch.Tensor, num_experts: int, block_m: int = BLOCK_M
) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] -> (sorted_ids [L] int32, block_experts [L // block_m] int32), L a static bound
    (T*k + E*(block_m - 1), rounded up to block_m). Ids outside [0, E) (another rank's experts) are dropped."""
    flat = topk_ids.reshape(-1).to(torch.int64)
    num_pairs, device = flat.numel(), flat.device
    length = triton.cdiv(num_pairs + num_experts * (block_m - 1), block_m) * block_m
    valid = (flat >= 0) & (flat < num_experts)
    key = torch.where(valid, flat, num_experts)  # dropped pairs sort last, into no expert's run
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    run_start = torch.cumsum(padded, 0) - padded  # [E] where each expert's padded run begins
    first = torch.cumsum(counts, 0) - counts  # [E] where each expert's pairs begin in `order`
    sorted_key = key[order]
    keep = sorted_key < num_experts
    expert_of = sorted_key[keep]
    rank = torch.arange(num_pairs, device=device)[keep] - first[expert_of]
    sorted_ids = torch.full((length,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids[run_start[expert_of] + rank] = order[keep].to(torch.int32)
    block_starts = torch.arange(0, length, block_m, device=device)
    block_experts = torch.searchsorted(torch.cumsum(padded, 0), block_starts, right=True)
    block_experts = torch.where(block_experts < num_experts, block_experts, -1).to(torch.int32)
    return sorted_ids, block_experts


@triton.jit
def _moe_gemm_kernel(
    a_ptr, b_ptr, c_ptr, weights_ptr, sorted_ids_ptr, block_experts_ptr, scale_ptr,
    N, K, num_pairs,
    stride_am, stride_be, stride_bn, stride_cm, stride_se, stride_sn, group_size,
    A_ROW_DIV: tl.constexpr, MUL_WEIGHT: tl.constexpr, BITS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """C[pair] = A[pair // A_ROW_DIV] @ B[expert]^T (x weight[pair]) for the BLOCK_M pairs of one block.
    BITS 4 / 8: B holds pack-quantized codes [E, N, K*BITS/32] int32 with scales [E, N, K/group]; each
    tile is dequantized in registers right after its load (the packed bytes are what is read)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    mask_m = pairs < num_pairs
    rows = tl.where(mask_m, pairs // A_ROW_DIV, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    b_base = b_ptr + expert * stride_be + offs_n[None, :].to(tl.int64) * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(
            a_ptr + rows[:, None] * stride_am + offs_k[None, :],
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        if BITS == 0:
            b = tl.load(b_base + offs_k[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        else:
            PER_WORD: tl.constexpr = 32 // BITS
            mask_b = mask_k[:, None] & mask_n[None, :]
            words = tl.load(b_base + offs_k[:, None] // PER_WORD, mask=mask_b, other=0)
            u = (words >> ((offs_k[:, None] % PER_WORD) * BITS)) & ((1 << BITS) - 1)
            q = (u - (1 << (BITS - 1))).to(tl.float32)
            s_ptrs = scale_ptr + expert * stride_se + offs_n[None, :].to(tl.int64) * stride_sn
            scale = tl.load(s_ptrs + offs_k[:, None] // group_size, mask=mask_b, other=0.0)
            b = (q * scale.to(tl.float32)).to(scale_ptr.dtype.element_ty).to(a_ptr.dtype.element_ty)
        acc += tl.dot(a, b)
    if MUL_WEIGHT:
        # the activation-dtype product first, then the fp32 weight, as the reference rounds it
        acc = acc.to(c_ptr.dtype.element_ty).to(tl.float32)
        acc *= tl.load(weights_ptr + tl.where(mask_m, pairs, 0), mask=mask_m, other=0.0)[:, None]
    out_rows = tl.where(mask_m, pairs, 0).to(tl.int64)
    tl.store(c_ptr + out_rows[:, None] * stride_cm + offs_n[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])  # fmt: skip


def _grouped_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    sorted_ids: torch.Tensor,
    block_experts: torch.Tensor,
    *,
    a_row_div: int,
    weights: torch.Tensor | None,
    scale: torch.Tensor | None = None,
    bits: int = 0,
) -> None:
    """out [P, N] (P = T*k pairs) <- a [rows, K] gathered by pair, times b [E, N, K] of each pair's expert
    (bits 4 / 8: b the packed codes [E, N, K*bits/32], scale [E, N, K/group])."""
    num_pairs, n = out.shape
    k = a.shape[1]
    assert a.stride(1) == 1 and b.stride(2) == 1 and out.stride(1) == 1
    group = k if scale is None else k // scale.shape[2]
    block_n = 64 if n >= 64 else max(16, triton.next_power_of_2(n))
    block_k = 64 if k >= 64 else max(16, triton.next_power_of_2(k))
    grid = (block_experts.numel(), triton.cdiv(n, block_n))
    scales = scale if scale is not None else out
    _moe_gemm_kernel[grid](
        a, b, out, weights if weights is not None else out, sorted_ids, block_experts, scales,
        n, k, num_pairs, a.stride(0), b.stride(0), b.stride(1), out.stride(0),
        scales.stride(0) if scale is not None else 0, scales.stride(1) if scale is not None else 0, group,
        A_ROW_DIV=a_row_div, MUL_WEIGHT=weights is not None, BITS=bits,
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """x [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_weights [T, k] fp32, topk_ids [T, k] -> [T, H] in x.dtype."""
    return _fused_moe(x, (w13, None), (w2, None), 0, topk_weights, topk_ids, activation)


def fused_moe_quant(
    x: torch.Tensor,
    w13_packed: torch.Tensor,
    w13_scale: torch.Tensor,
    w2_packed: torch.Tensor,
    w2_scale: torch.Tensor,
    bits: int,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str = "silu",
) -> torch.Tensor:
    """fused_moe on W4A16 / W8A16 experts: w13_packed [E, 2I, H*bits/32] int32 + w13_scale [E, 2I, H/group],
    w2_packed [E, H, I*bits/32] + w2_scale [E, H, I/group] (compressed-tensors pack-quantized, stacked)."""
    return _fused_moe(
        x, (w13_packed, w13_scale), (w2_packed, w2_scale), bits, topk_weights, topk_ids, activation
    )


def _fused_moe(
    x: torch.Tensor,
    w13: tuple[torch.Tensor, torch.Tensor | None],
    w2: tuple[torch.Tensor, torch.Tensor | None],
    bits: int,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    num_tokens, top_k = topk_ids.shape
    num_experts, two_inter = w13[0].shape[:2]
    hidden = x.shape[1]
    if num_tokens == 0:
        return torch.zeros_like(x)
    x = x.contiguous()
    sorted_ids, block_experts = align_by_expert(topk_ids, num_experts)
    num_pairs = num_tokens * top_k
    gate_up = torch.empty(num_pairs, two_inter, dtype=x.dtype, device=x.device)
    _grouped_gemm(x, w13[0], gate_up, sorted_ids, block_experts, a_row_div=top_k, weights=None,
                  scale=w13[1], bits=bits)  # fmt: skip
    if activation == "silu":
        from .activation import silu_and_mul

        inter = silu_and_mul(gate_up)
    else:
        inter = act_and_mul(gate_up, activation)
    # pairs no expert of this rank computes (ids outside [0, E)) stay zero
    down = torch.zeros(num_pairs, hidden, dtype=x.dtype, device=x.device)
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    _grouped_gemm(inter, w2[0], down, sorted_ids, block_experts, a_row_div=1, weights=weights,
                  scale=w2[1], bits=bits)  # fmt: skip
    return down.view(num_tokens, top_k, hidden).sum(dim=1)
