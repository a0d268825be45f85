"""Paged decode attention (one query token per sequence), GQA-aware, split-K (flash-decoding).

Stage 1, grid (B, Hkv, num_splits): a program loads the GROUP = Hq/Hkv query heads of one KV head
as a [BLOCK_H >= 16, D] tile (so K/V are read once per KV head and the scores are a tensor-core dot),
walks its split of the sequence BLOCK_N tokens at a time through the block table, and keeps an
online softmax in fp32. With one split it writes the output directly; otherwise it writes the
split's normalized partial output and base-2 log-sum-exp, and stage 2, grid (B, Hq), merges splits.

    q [B, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks] int32;
    seq_lens [B] int32 (the current token's K/V already cached; 0 = padding row -> zeros)
INT8 KV: int8 caches + k/v_scale_cache [num_blocks, block_size, Hkv] fp32; the K scale multiplies the
scores, the V scale the probabilities, so the dots stay 16-bit. Reference: `reference.paged_decode_attention`.
Per-layer score options (see `reference.attention_scores`): sliding_window (a runtime int: only the last
`window` keys are read, so blocks before them may already belong to someone else), logits_soft_cap
(a runtime float; cap * tanh(s / cap) under a constexpr switch) and alibi_slopes ([Hq] fp32, a pointer).
The wrapper never reads device values: safe inside CUDA-graph capture (window, cap and slopes are fixed
per layer, so a captured graph holds them as constants).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
_LOG2E: tl.constexpr = tl.constexpr(LOG2E)  # the same, readable inside kernels
NO_WINDOW = 1 << 30  # sliding_window passed to the kernels when there is none


@triton.jit
def _tanh(x):
    """tanh from exp2, saturating (no NaN) for any |x|; `tl` has no tanh on every backend."""
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * _LOG2E)) + 1.0)


@triton.jit
def score_options(s, distance, slopes, sm_scale, soft_cap, SOFT_CAP: tl.constexpr, ALIBI: tl.constexpr):
    """Natural-log scores -> log2 domain: (cap * tanh(s * scale / cap) + slope * distance) * log2(e).
    distance = key_pos - query_pos; slopes broadcastable to s. Shared by the decode and prefill kernels."""
    s = s * sm_scale
    if SOFT_CAP:
        s = soft_cap * _tanh(s / soft_cap)
    if ALIBI:
        s = s + slopes * distance.to(tl.float32)
    return s * _LOG2E


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_tables_ptr, seq_lens_ptr, alibi_ptr,
    out_ptr, mid_o_ptr, mid_lse_ptr,
    sm_scale, soft_cap,
    stride_qb, stride_qh, stride_bt, stride_ob, stride_oh,
    split_len, sliding_window,
    GROUP: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, INT8: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SOFT_CAP: tl.constexpr, ALIBI: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    kv_start = tl.maximum(seq_len - sliding_window, 0)  # no window: sliding_window = NO_WINDOW
    split_start = kv_start + split * split_len
    split_end = tl.minimum(split_start + split_len, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + offs_h
    mask_h = offs_h < GROUP
    mask_d = offs_d < HEAD_DIM
    q = tl.load(
        q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=mask_h[:, None] & mask_d[None, :],
        other=0.0,
    )  # [BLOCK_H, BLOCK_D]
    slopes = tl.zeros([BLOCK_H, 1], dtype=tl.float32)
    if ALIBI:
        slopes = tl.load(alibi_ptr + heads, mask=mask_h, other=0.0)[:, None]  # [BLOCK_H, 1]

    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)  # finite: a fully masked tile yields p = 0, not NaN
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    token_stride = NUM_KV_HEADS * HEAD_DIM
    for start in range(split_start, split_end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < split_end
        block_ids = tl.load(block_tables_ptr + seq * stride_bt + offs_n // BLOCK_SIZE, mask=mask_n, other=0)
        slots = block_ids.to(tl.int64) * BLOCK_SIZE + offs_n % BLOCK_SIZE  # [BLOCK_N]
        kv_offs = slots[:, None] * token_stride + kv_head * HEAD_DIM + offs_d[None, :]
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
        if INT8:  # int8 -> fp32 -> q dtype: exact, and the interpreter cannot cast int8 to bf16 directly
            k = k.to(tl.float32).to(q.dtype)
            v = v.to(tl.float32).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_H, BLOCK_N] fp32
        if INT8:
            s = s * tl.load(k_scale_ptr + slots * NUM_KV_HEADS + kv_head, mask=mask_n, other=0.0)[None, :]
        s = score_options(s, offs_n[None, :] - (seq_len - 1), slopes, sm_scale, soft_cap, SOFT_CAP, ALIBI)
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if INT8:
            p = p * tl.load(v_scale_ptr + slots * NUM_KV_HEADS + kv_head, mask=mask_n, other=0.0)[None, :]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # empty split / padding row: zeros
    mask_hd = mask_h[:, None] & mask_d[None, :]
    if NUM_SPLITS == 1:
        o_ptrs = out_ptr + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_hd)
    else:
        row = (seq * NUM_KV_HEADS * GROUP + heads) * NUM_SPLITS + split  # mid_* [B, Hq, NUM_SPLITS, (D)]
        tl.store(mid_o_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=mask_hd)
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(mid_lse_ptr + row, lse, mask=mask_h)


@triton.jit
def _decode_reduce_kernel(
    mid_o_ptr, mid_lse_ptr, out_ptr, stride_ob, stride_oh,
    NUM_Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < NUM_SPLITS
    row = (seq * NUM_Q_HEADS + head) * NUM_SPLITS + offs_s
    lse = tl.load(mid_lse_ptr + row, mask=mask_s, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # all splits empty: weights 0, output 0
    w = tl.exp2(lse - lse_max)  # [BLOCK_S]
    o = tl.load(mid_o_ptr + row[:, None] * HEAD_DIM + offs_d[None, :],
                mask=mask_s[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)  # fmt: skip
    w_sum = tl.sum(w, axis=0)
    out = tl.sum(o * w[:, None], axis=0) / tl.where(w_sum > 0, w_sum, 1.0)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)  # fmt: skip


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: a few splits, enough to exercise the reduce
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(
    batch: int, num_kv_heads: int, max_context: int, device: torch.device, block_n: int
) -> int:
    """Enough programs to fill the GPU twice over, but at least 4 tiles of work per split."""
    max_useful = max(1, triton.cdiv(max_context, 4 * block_n))
    wanted = triton.cdiv(2 * _num_sms(device), max(1, batch * num_kv_heads))
    return int(max(1, min(max_useful, wanted, 64)))


def check_paged_attention_args(
    q,
    k_cache,
    v_cache,
    block_tables,
    seq_lens,
    k_scale_cache,
    v_scale_cache,
    sliding_window=None,
    alibi_slopes=None,
    logits_soft_cap=None,
):
    """Shared by the decode and prefill wrappers; returns (group, int8)."""
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    assert q.dim() == 3 and q.shape[2] == head_dim and q.stride(-1) == 1, (q.shape, q.stride(), k_cache.shape)
    assert q.shape[1] % num_kv_heads == 0, f"{q.shape[1]} query heads vs {num_kv_heads} KV heads"
    assert v_cache.shape == k_cache.shape and v_cache.dtype == k_cache.dtype, (v_cache.shape, k_cache.shape)
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "KV caches must be contiguous"
    assert block_tables.dim() == 2 and block_tables.dtype == torch.int32, (
        block_tables.shape,
        block_tables.dtype,
    )
    assert block_tables.stride(1) == 1, block_tables.stride()
    assert seq_lens.shape == (block_tables.shape[0],) and seq_lens.dtype == torch.int32, (
        seq_lens.shape,
        seq_lens.dtype,
    )
    assert q.dtype in (torch.float16, torch.bfloat16, torch.float32), q.dtype
    int8 = k_cache.dtype == torch.int8
    if int8:
        assert k_scale_cache is not None and v_scale_cache is not None, "INT8 KV cache needs k/v_scale_cache"
        for sc in (k_scale_cache, v_scale_cache):
            assert sc.shape == k_cache.shape[:3] and sc.dtype == torch.float32 and sc.is_contiguous(), (
                sc.shape
            )
    else:
        assert k_cache.dtype == q.dtype, f"cache {k_cache.dtype} vs q {q.dtype}"
    assert head_dim >= 16, "tl.dot needs head_dim >= 16"
    assert sliding_window is None or sliding_window > 0, (
        f"sliding_window must be positive, got {sliding_window}"
    )
    assert logits_soft_cap is None or logits_soft_cap > 0, (
        f"logits_soft_cap must be positive, got {logits_soft_cap}"
    )
    if alibi_slopes is not None:
        assert alibi_slopes.shape == (q.shape[1],) and alibi_slopes.dtype == torch.float32, (
            f"alibi_slopes must be [{q.shape[1]}] fp32, got {tuple(alibi_slopes.shape)} {alibi_slopes.dtype}"
        )
        assert alibi_slopes.device == q.device and alibi_slopes.is_contiguous(), alibi_slopes.device
    return q.shape[1] // num_kv_heads, int8


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    k_scale_cache: torch.Tensor | None = None,
    v_scale_cache: torch.Tensor | None = None,
    sliding_window: int | None = None,
    alibi_slopes: torch.Tensor | None = None,
    logits_soft_cap: float | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """q [B, Hq, D] -> out [B, Hq, D] (q.dtype). num_splits None: chosen from the static shapes
    (block_tables.shape[1] * block_size bounds the context), never from seq_lens' values."""
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
    batch, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    block_n = 64 if q.is_cuda else 16
    max_context = block_tables.shape[1] * block_size
    if sliding_window:
        max_context = min(max_context, sliding_window)
    if num_splits is None:
        num_splits = choose_num_splits(batch, num_kv_heads, max_context, q.device, block_n)
    split_len = triton.cdiv(triton.cdiv(max_context, num_splits), block_n) * block_n
    out = torch.empty(batch, num_q_heads, head_dim, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    mid_o = mid_lse = out  # unused with one split
    if num_splits > 1:
        mid_o = torch.empty(batch, num_q_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        mid_lse = torch.empty(batch, num_q_heads, num_splits, dtype=torch.float32, device=q.device)
    k_scale = k_scale_cache if int8 else k_cache
    v_scale = v_scale_cache if int8 else v_cache
    block_d = triton.next_power_of_2(head_dim)
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, k_scale, v_scale, block_tables, seq_lens,
        alibi_slopes if alibi_slopes is not None else seq_lens,  # unused pointer without ALiBi
        out, mid_o, mid_lse,
        scale, logits_soft_cap or 1.0,
        q.stride(0), q.stride(1), block_tables.stride(0), out.stride(0), out.stride(1),
        split_len, sliding_window or NO_WINDOW,
        GROUP=group, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d, BLOCK_N=block_n,
        NUM_SPLITS=num_splits, INT8=int8, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        SOFT_CAP=logits_soft_cap is not None, ALIBI=alibi_slopes is not None,
        num_warps=4, num_stages=2,
    )  # fmt: skip
    if num_splits > 1:
        _decode_reduce_kernel[(batch, num_q_heads)](
            mid_o, mid_lse, out, out.stride(0), out.stride(1),
            NUM_Q_HEADS=num_q_heads, HEAD_DIM=head_dim, NUM_SPLITS=num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d,
        )  # fmt: skip
    return out


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
