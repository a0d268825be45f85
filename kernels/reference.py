"""Plain torch references of every kernel: the spec the Triton kernels are tested against, and the
CPU backend of the engine (`backend.get_ops("cpu")`). Readability first; math in fp32.

Shapes (T tokens, B sequences, Hq query heads, Hkv KV heads, D head dim):
    paged KV cache per layer: k_cache, v_cache [num_blocks, block_size, Hkv, D]
    INT8 cache: int8 codes + k_scale_cache, v_scale_cache [num_blocks, block_size, Hkv] fp32
    slot_mapping [T] int (block_id * block_size + offset; -1: padding, not written)
    block_tables [B, max_blocks] int32, seq_lens [B] int32 (tokens in the cache, current ones included)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .alibi import alibi_slopes as alibi_slopes  # re-exported: one home, next to its derivation
from .quant_pack import dequantize_weight

# --- normalization / activation -------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """[..., H] -> [..., H], as HF Llama: normalize in fp32, round to x.dtype, then scale by weight."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * normed.to(x.dtype)).to(x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual' = x + residual (in x.dtype); returns (rms_norm(residual'), residual')."""
    new_residual = x + residual
    return rms_norm(new_residual, weight, eps), new_residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2I] -> [..., I]: silu(gate) * up, gate = first half."""
    gate, up = x.chunk(2, dim=-1)
    return (F.silu(gate.float()) * up.float()).to(x.dtype)


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,  # exact (erf)
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # HF gelu_new / gelu_pytorch_tanh
    "relu": F.relu,
}


def activation(x: torch.Tensor, act: str) -> torch.Tensor:
    """act(x) in fp32, rounded to x.dtype; act one of silu, gelu, gelu_tanh, relu (the plain-MLP activation)."""
    return _ACTIVATIONS[act](x.float()).to(x.dtype)


def act_and_mul(x: torch.Tensor, act: str) -> torch.Tensor:
    """[..., 2I] -> [..., I]: act(gate) * up, gate = first half (silu: `silu_and_mul`; gelu_tanh: GeGLU)."""
    gate, up = x.chunk(2, dim=-1)
    return (_ACTIVATIONS[act](gate.float()) * up.float()).to(x.dtype)


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm: normalize and scale by (1 + weight), both in fp32, then round to x.dtype."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * (1.0 + weight.float())).to(x.dtype)


# --- rotary embedding -------------------------------------------------------------------------------


def rope(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox_style: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on q [T, Hq, D] and k [T, Hkv, D] in place; returns (q, k).

    cos_sin_cache [rows, R] (R = rotary dim <= D): cos half then sin half; `positions` [T] picks each
    token's row. Only the first R dims rotate, the rest pass through (partial rotary). Pair i is
    (x[i], x[i + R/2]) in the neox / HF rotate_half layout, (x[2i], x[2i+1]) in the interleaved GPT-J
    layout (is_neox_style=False: GLM, ChatGLM, GPT-J, Cohere); both turn pair i by angle i:
        (a, b) -> (a*cos - b*sin, b*cos + a*sin).
    """
    half = cos_sin_cache.shape[1] // 2
    cos, sin = cos_sin_cache[positions.long()].float().split(half, dim=-1)  # [T, R/2] each
    cos, sin = cos[:, None, :], sin[:, None, :]
    for x in (q, k):
        rot = x[..., : 2 * half]
        pairs = (
            rot.unflatten(-1, (2, half)) if is_neox_style else rot.unflatten(-1, (half, 2)).transpose(-1, -2)
        )
        a, b = pairs[..., 0, :].float(), pairs[..., 1, :].float()  # [T, H, R/2] each
        rotated = torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-2)  # [T, H, 2, R/2]
        if not is_neox_style:
            rotated = rotated.transpose(-1, -2)  # [T, H, R/2, 2]: back to (2i, 2i+1)
        x[..., : 2 * half] = rotated.flatten(-2).to(x.dtype)
    return q, k


# --- KV cache writes -------------------------------------------------------------------------------


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Writes key/value [T, Hkv, D] into the paged caches at slot_mapping (slot -1: skipped)."""
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, num_kv_heads, head_dim)[slots] = key[valid].to(k_cache.dtype)
    v_cache.view(-1, num_kv_heads, head_dim)[slots] = value[valid].to(v_cache.dtype)


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-(token, head) int8: x [..., D] -> codes [..., D] int8, scale [...] fp32.

    scale = absmax / 127; code = round-half-away-from-zero(x * (127 / absmax)); an all-zero row: scale 0.
    """
    xf = x.float()
    absmax = xf.abs().amax(-1)
    inv = torch.where(absmax > 0, 127.0 / absmax, torch.zeros_like(absmax))
    y = xf * inv[..., None]
    codes = torch.trunc(y + torch.where(y >= 0, 0.5, -0.5)).clamp(-127, 127)
    return codes.to(torch.int8), absmax / 127.0


def reshape_and_cache_int8(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale_cache: torch.Tensor,
    v_scale_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Quantizes key/value [T, Hkv, D] per token-head and writes codes + scales by slot_mapping."""
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    for x, cache, scale_cache in ((key, k_cache, k_scale_cache), (value, v_cache, v_scale_cache)):
        codes, scale = quantize_int8(x[valid])
        cache.view(-1, num_kv_heads, head_dim)[slots] = codes
        scale_cache.view(-1, num_kv_heads)[slots] = scale


# --- attention over the paged cache ---------------------------------------------------------------


def gather_kv(
    cache: torch.Tensor, block_table: torch.Tensor, seq_len: int, scale_cache: torch.Tensor | None = None
) -> torch.Tensor:
    """The first seq_len tokens of one sequence: [seq_len, Hkv, D] fp32 (INT8 codes dequantized).
    Reads whole blocks (its first ceil(seq_len / block_size) table entries), never a padded context."""
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    return read_blocks(cache, block_table[None, :num_blocks], scale_cache)[0, :seq_len]


def read_blocks(
    cache: torch.Tensor, blocks: torch.Tensor, scale_cache: torch.Tensor | None = None
) -> torch.Tensor:
    """cache [num_blocks, block_size, Hkv, D], blocks [B, C] block ids -> [B, C * block_size, Hkv, D] fp32:
    the tokens of those blocks in table order (INT8 codes times their scales)."""
    rows, cols = blocks.shape
    ids = blocks.reshape(-1).long()
    x = cache.index_select(0, ids).float()  # [B * C, block_size, Hkv, D]
    if scale_cache is not None:
        x = x * scale_cache.index_select(0, ids).unsqueeze(-1)
    return x.view(rows, cols * cache.shape[1], *cache.shape[2:])


def score_mods(
    scores: torch.Tensor,
    distance: torch.Tensor,
    *,
    sliding_window: int | None = None,
    alibi_slopes: torch.Tensor | None = None,
    logits_soft_cap: float | None = None,
) -> torch.Tensor:
    """The per-layer options on scaled fp32 scores, in this order (`attention_scores`): soft cap, ALiBi
    (alibi_slopes already shaped to broadcast against scores), then the causal (+ window) mask from
    distance = j - i (key position minus query position, broadcastable against scores)."""
    if logits_soft_cap is not None:
        scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
    if alibi_slopes is not None:
        scores = scores + alibi_slopes * distance
    visible = distance <= 0
    if sliding_window is not None:
        visible = visible & (distance > -sliding_window)
    return scores.masked_fill(~visible, float("-inf"))


def attention_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    q_positions: torch.Tensor,
    scale: float,
    *,
    sliding_window: int | None = None,
    alibi_slopes: torch.Tensor | None = None,
    logits_soft_cap: float | None = None,
) -> torch.Tensor:
    """Masked fp32 scores [Hq, Tq, S] of q [Tq, Hq, D] at absolute q_positions against k [S, Hkv, D] at
    positions 0..S-1 (GQA: query head h reads KV head h // (Hq / Hkv)). In this order:
        s = scale * q.k                                    (scale: head_dim ** -0.5 or the layer's own)
        s = cap * tanh(s / cap)                            (logits_soft_cap, Gemma2)
        s = s + slope[h] * (j - i)                         (alibi_slopes [Hq], BLOOM / MPT / Falcon)
        s = -inf unless i - window < j <= i                (causal; sliding_window: the last `window` keys)
    """
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    distance = torch.arange(k.shape[0], device=q.device)[None, :] - q_positions[:, None]  # j - i [Tq, S]
    slopes = None if alibi_slopes is None else alibi_slopes.float()[:, None, None]
    return score_mods(
        scores, distance, sliding_window=sliding_window, alibi_slopes=slopes, logits_soft_cap=logits_soft_cap
    )


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_positions: torch.Tensor, scale: float, **score_args
) -> torch.Tensor:
    """softmax(attention_scores) @ v: q [Tq, Hq, D], v [S, Hkv, D] -> [Tq, Hq, D] fp32."""
    group = q.shape[1] // v.shape[1]
    probs = attention_scores(q, k, q_positions, scale, **score_args).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v.float().repeat_interleave(group, dim=1))


DECODE_CHUNK_TOKENS = 128  # context tokens per step of the blockwise decode loop (rounded to whole blocks)


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
    """One new token per sequence: q [B, Hq, D] attends to its seq_lens[b] cached tokens -> [B, Hq, D].

    Equal to softmax(attention_scores) @ v per sequence, computed the way the kernel does: the batch walks
    the block tables DECODE_CHUNK_TOKENS at a time with an online softmax (running max, sum and weighted
    values per row), so each sequence reads its own blocks only, never a context padded to the longest one.
    Sequences are taken longest first, so the rows still reading at chunk c are a prefix of the batch.
    Chunks wholly before every row's window are skipped. A sequence with seq_len 0 (batch padding) yields
    zeros. num_splits is a kernel tuning knob, ignored here.
    """
    out = torch.zeros_like(q)
    lens = seq_lens.long()
    live = (lens > 0).nonzero().squeeze(1)
    if live.numel() == 0:
        return out
    order = live[lens[live].argsort(descending=True, stable=True)]
    lens_sorted = lens[order]
    len_list = lens_sorted.tolist()
    batch, (num_heads, head_dim) = len(len_list), q.shape[1:]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    tables = block_tables[order]
    qg = q[order].float().view(batch, num_kv_heads, group, head_dim)
    q_pos = (lens_sorted - 1)[:, None, None, None]  # [B, 1, 1, 1]
    slopes = None if alibi_slopes is None else alibi_slopes.float().view(1, num_kv_heads, group, 1)
    running_max = torch.full((batch, num_kv_heads, group), float("-inf"), device=q.device)
    running_sum = torch.zeros(batch, num_kv_heads, group, device=q.device)
    acc = torch.zeros(batch, num_kv_heads, group, head_dim, device=q.device)
    chunk = max(1, DECODE_CHUNK_TOKENS // block_size)  # blocks per step
    num_blocks = [-(-n // block_size) for n in len_list]
    first = 0
    if sliding_window is not None:  # blocks wholly before the window of every row are never read
        first = max(0, min(len_list) - sliding_window) // block_size
    for start in range(first, num_blocks[0], chunk):
        rows = sum(1 for n in num_blocks if n > start)  # a prefix: rows are sorted by length
        blocks = tables[:rows, start : start + chunk]
        k = read_blocks(k_cache, blocks, k_scale_cache)  # [rows, K, Hkv, D]
        v = read_blocks(v_cache, blocks, v_scale_cache)
        k_pos = start * block_size + torch.arange(k.shape[1], device=q.device)
        distance = k_pos[None, None, None, :] - q_pos[:rows]  # [rows, 1, 1, K]
        scores = torch.einsum("bhgd,bkhd->bhgk", qg[:rows], k) * scale
        scores = score_mods(
            scores,
            distance,
            sliding_window=sliding_window,
            alibi_slopes=slopes,
            logits_soft_cap=logits_soft_cap,
        )
        new_max = torch.maximum(running_max[:rows], scores.amax(-1))
        shift = torch.where(new_max == float("-inf"), 0.0, new_max)  # nothing visible yet: exp(-inf) = 0
        probs = torch.exp(scores - shift[..., None])
        correction = torch.exp(running_max[:rows] - shift)
        running_sum[:rows] = running_sum[:rows] * correction + probs.sum(-1)
        acc[:rows] = acc[:rows] * correction[..., None] + torch.einsum("bhgk,bkhd->bhgd", probs, v)
        running_max[:rows] = new_max
    out[order] = (acc / running_sum[..., None]).view(batch, num_heads, head_dim).to(q.dtype)
    return out


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
    """Varlen chunks: q [total_q, Hq, D]; sequence b owns rows cu_seqlens_q[b]:cu_seqlens_q[b+1], the LAST
    q_len of its seq_lens[b] cached tokens (its own K/V already written), and attends causally to all
    seq_lens[b] of them (scores as in `attention_scores`) -> [total_q, Hq, D]. Each sequence reads exactly
    its own blocks. max_q_len sizes the kernel grid, ignored here.
    """
    score_args = dict(
        sliding_window=sliding_window, alibi_slopes=alibi_slopes, logits_soft_cap=logits_soft_cap
    )
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    for b, seq_len in enumerate(seq_lens.tolist()):
        q_start, q_end = cu[b], cu[b + 1]
        if q_end == q_start:
            continue
        k = gather_kv(k_cache, block_tables[b], seq_len, k_scale_cache)
        v = gather_kv(v_cache, block_tables[b], seq_len, v_scale_cache)
        q_positions = torch.arange(seq_len - (q_end - q_start), seq_len, device=q.device)
        out[q_start:q_end] = _attend(q[q_start:q_end], k, v, q_positions, scale, **score_args).to(q.dtype)
    return out


# --- sampling --------------------------------------------------------------------------------------


def sampling_mask(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor | None = None
) -> torch.Tensor:
    """Tokens kept for sampling, [B, V] bool, from temperature-scaled fp32 logits [B, V].

    top_k [B] (<= 0 or >= V: off): keep logits >= the k-th largest (ties kept).
    top_p [B] (>= 1: off), on the softmax of the top-k survivors: keep token i iff the mass of tokens
    strictly more likely than i is < top_p (the smallest head of the sorted list reaching top_p; ties kept).
    min_p [B] (0: off): keep p_i >= min_p * p_max. The three masks intersect.
    """
    batch, vocab = logits.shape
    sorted_logits = logits.sort(dim=-1, descending=True).values
    k = torch.where((top_k <= 0) | (top_k >= vocab), vocab, top_k).long()
    kth_largest = sorted_logits.gather(1, (k - 1)[:, None])
    keep = logits >= kth_largest

    probs = logits.masked_fill(~keep, float("-inf")).softmax(-1)
    sorted_probs = probs.sort(dim=-1, descending=True).values
    mass_before = sorted_probs.cumsum(-1) - sorted_probs  # exclusive cumsum
    num_kept = (mass_before < top_p[:, None]).sum(-1, keepdim=True).clamp(min=1)
    smallest_kept = sorted_probs.gather(1, num_kept - 1)
    keep_p = probs >= smallest_kept
    keep &= torch.where((top_p >= 1.0)[:, None], True, keep_p)

    if min_p is not None:
        probs_all = logits.softmax(-1)
        keep &= probs_all >= min_p[:, None] * probs_all.amax(-1, keepdim=True)
    return keep


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Guided decoding: logits [B, V] with rows[i]'s disallowed tokens set to -inf, in place.

    bitmask [R, ceil(V / 32)] int32, one row per entry of rows [R] (int64 row indices into logits):
    bit t % 32 of word t // 32 set means token t is allowed (llguidance / xgrammar layout). Rows not
    listed are untouched, so unconstrained rows pay nothing beyond this gather.
    """
    vocab = logits.shape[-1]
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).flatten(1)[:, :vocab].bool()  # [R, V]
    logits[rows] = logits[rows].masked_fill(~allowed.to(logits.device), float("-inf"))
    return logits


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    min_p: torch.Tensor | None = None,
    uniform: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids [B] int64 from logits [B, V].

    temperature [B] (0: greedy argmax of the raw logits, first index on ties). Otherwise Gumbel-max over the
    kept tokens of logits / temperature, with noise g = -log(-log(uniform)), uniform [B, V] in [0, 1)
    (drawn with `generator` when not given): exact categorical sampling without a softmax or a sort.
    """
    batch, vocab = logits.shape
    device = logits.device
    if top_k is None:
        top_k = torch.zeros(batch, dtype=torch.int32, device=device)
    if top_p is None:
        top_p = torch.ones(batch, dtype=torch.float32, device=device)
    if uniform is None:
        uniform = torch.rand(batch, vocab, device=device, generator=generator)
    greedy = temperature <= 0
    inv_temperature = torch.where(greedy, 1.0, 1.0 / temperature.float())
    scaled = logits.float() * inv_temperature[:, None]
    keep = sampling_mask(scaled, top_k, top_p, min_p)
    gumbel = -torch.log(-torch.log(uniform.float()))
    sampled = (scaled + gumbel).masked_fill(~keep, float("-inf")).argmax(-1)
    return torch.where(greedy, logits.float().argmax(-1), sampled)


# --- weight-only quantized linear ------------------------------------------------------------------


def quant_linear(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    bits: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """W{bits}A16: x [..., K] @ dequant(W)^T -> [..., N]; W from pack-quantized [N, K*bits/32] int32 and
    weight_scale [N, K/group] (group = K // weight_scale.shape[1]; per-channel: [N, 1])."""
    shape = (weight_packed.shape[0], x.shape[-1])
    weight = dequantize_weight(weight_packed, weight_scale, bits, shape).to(x.dtype)
    return F.linear(x, weight, bias)


# --- multi-LoRA (punica-style shrink / expand over a batch of mixed adapters) ---------------------


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """x [T, K] -> [T, R]: row t is x[t] @ lora_a[token_slots[t]]^T (fp32 accumulate, x.dtype out);
    lora_a [S, R, K] stacks the A matrices of S adapter slots (ranks below R zero-padded);
    token_slots [T] int: a slot, or -1 for a base-model token (its row is zero). One matmul per slot
    present in the batch, over the rows that use it (SGMV's segments, gathered)."""
    out = torch.zeros(x.shape[0], lora_a.shape[1], dtype=x.dtype, device=x.device)
    for slot in torch.unique(token_slots[token_slots >= 0]).tolist():
        rows = (token_slots == slot).nonzero(as_tuple=True)[0]
        out[rows] = (x[rows].float() @ lora_a[slot].float().t()).to(x.dtype)
    return out


def lora_expand(
    y: torch.Tensor,
    buf: torch.Tensor,
    lora_b: torch.Tensor,
    token_slots: torch.Tensor,
    scales: torch.Tensor,
) -> None:
    """y [T, N] += scales[s] * buf[t] @ lora_b[s]^T for s = token_slots[t] >= 0, in place (y may be a
    column slice of a fused output); buf [T, R] from `lora_shrink`, lora_b [S, N, R], scales [S] fp32.
    The sum is taken in fp32 and rounded once to y.dtype; base-model rows (-1) are left untouched."""
    for slot in torch.unique(token_slots[token_slots >= 0]).tolist():
        rows = (token_slots == slot).nonzero(as_tuple=True)[0]
        delta = (buf[rows].float() @ lora_b[slot].float().t()) * scales[slot].float()
        y[rows] = (y[rows].float() + delta).to(y.dtype)
