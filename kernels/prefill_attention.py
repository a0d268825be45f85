"""Prefill / extend attention over the paged KV cache (chunked prefill, prefix-cache hits).

A varlen batch of query chunks: sequence b owns q rows cu_seqlens_q[b]:cu_seqlens_q[b+1] (q_len of them),
which are the LAST q_len of its seq_lens[b] cached tokens (the chunk's own K/V are already written).
Query i of the chunk sits at position prefix + i (prefix = seq_len - q_len) and attends to keys
0..prefix+i (and only the last `sliding_window` of those when set: keys before that window are never
read), with the per-layer score options of the decode kernel (soft cap, ALiBi; `reference.attention_scores`).

Grid (cdiv(max_q_len, BLOCK_M), B, Hq): a program owns BLOCK_M query rows of one head and streams that
sequence's keys up to its last row's position through the block table, BLOCK_N at a time, with an
online softmax in fp32 (exp2 domain). Programs past a chunk's end do no work.
Reference: `reference.paged_prefill_attention`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .decode_attention import NO_WINDOW, check_paged_attention_args, score_options


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_tables_ptr, seq_lens_ptr, cu_seqlens_q_ptr,
    alibi_ptr, out_ptr,
    sm_scale, soft_cap,
    stride_qt, stride_qh, stride_bt, stride_ot, stride_oh,
    sliding_window,
    GROUP: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    INT8: tl.constexpr, DOT_PRECISION: tl.constexpr, SOFT_CAP: tl.constexpr, ALIBI: tl.constexpr,
):  # fmt: skip
    m_start = tl.program_id(0) * BLOCK_M
    seq = tl.program_id(1).to(tl.int64)
    head = tl.program_id(2)
    kv_head = head // GROUP
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix = seq_len - q_len

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < q_len
    mask_d = offs_d < HEAD_DIM
    q_pos = prefix + offs_m  # absolute positions of this program's rows
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        q_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    )  # [BLOCK_M, BLOCK_D]
    slope = 0.0
    if ALIBI:
        slope = tl.load(alibi_ptr + head)

    # Keys this program needs: [first row's window start, last valid row's position]; none past the chunk.
    kv_start = tl.maximum(prefix + m_start - sliding_window + 1, 0)
    kv_end = tl.minimum(prefix + m_start + BLOCK_M, seq_len)
    kv_end = tl.where(m_start < q_len, kv_end, 0)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: a row fully masked in a tile gets p = 0
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    token_stride = NUM_KV_HEADS * HEAD_DIM
    for start in range(kv_start, kv_end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < kv_end
        block_ids = tl.load(block_tables_ptr + seq * stride_bt + offs_n // BLOCK_SIZE, mask=mask_n, other=0)
        slots = block_ids.to(tl.int64) * BLOCK_SIZE + offs_n % BLOCK_SIZE
        kv_offs = slots[:, None] * token_stride + kv_head * HEAD_DIM + offs_d[None, :]
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
        if INT8:
            k = k.to(tl.float32).to(q.dtype)
            v = v.to(tl.float32).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N] fp32
        if INT8:
            s = s * tl.load(k_scale_ptr + slots * NUM_KV_HEADS + kv_head, mask=mask_n, other=0.0)[None, :]
        distance = offs_n[None, :] - q_pos[:, None]  # key_pos - query_pos [BLOCK_M, BLOCK_N]
        s = score_options(s, distance, slope, sm_scale, soft_cap, SOFT_CAP, ALIBI)
        visible = (distance <= 0) & (distance > -sliding_window)
        s = tl.where(visible & mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if INT8:
            p = p * tl.load(v_scale_ptr + slots * NUM_KV_HEADS + kv_head, mask=mask_n, other=0.0)[None, :]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = out_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_q_len: int,
    scale: float,
    *,
    k_scale_cache: torch.Tensor | None = None,
    v_scale_cache: torch.Tensor | None = None,
    sliding_window: int | None = None,
    alibi_slopes: torch.Tensor | None = None,
    logits_soft_cap: float | None = None,
) -> torch.Tensor:
    """q [total_q, Hq, D] -> out [total_q, Hq, D]. cu_seqlens_q [B+1] int32; max_q_len (a host int, >= every
    chunk length) sizes the grid, so the wrapper never reads device values."""
    group, int8 = check_paged_attention_args(
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        k_scale_cache,
        v_scale_cache,
        sliding_window,
        alibi_slopes,
        logits_soft_cap,
    )
    batch = block_tables.shape[0]
    assert cu_seqlens_q.shape == (batch + 1,) and cu_seqlens_q.dtype == torch.int32, cu_seqlens_q.shape
    total_q, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty(total_q, num_q_heads, head_dim, dtype=q.dtype, device=q.device)
    if total_q == 0 or batch == 0 or max_q_len == 0:
        return out
    block_m, block_n = (64, 64) if q.is_cuda else (16, 16)
    if q.is_cuda and q.dtype == torch.float32:
        block_m, block_n = 32, 32  # fp32 tiles: keep shared memory in budget
    k_scale = k_scale_cache if int8 else k_cache
    v_scale = v_scale_cache if int8 else v_cache
    grid = (triton.cdiv(max_q_len, block_m), batch, num_q_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, k_scale, v_scale, block_tables, seq_lens, cu_seqlens_q,
        alibi_slopes if alibi_slopes is not None else seq_lens,  # unused pointer without ALiBi
        out,
        scale, logits_soft_cap or 1.0,
        q.stride(0), q.stride(1), block_tables.stride(0), out.stride(0), out.stride(1),
        sliding_window or NO_WINDOW,
        GROUP=group, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(head_dim),
        INT8=int8, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        SOFT_CAP=logits_soft_cap is not None, ALIBI=alibi_slopes is not None,
        num_warps=4, num_stages=2,
    )  # fmt: skip
    return out
