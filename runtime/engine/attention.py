"""Paged attention behind one interface.

The model runner describes a step once (`CommonAttentionMetadata`: which tokens belong to which
sequence, where their K/V go, each sequence's block table); the chosen backend turns that into
its own metadata once per step (`build_metadata`) and then runs every layer (`forward`). The torch
backend here is the readable reference that runs on CPU; `KernelAttentionBackend` runs the
Triton kernels of `lmforge.kernels`; `get_attention_backend` picks one without touching the models.

KV cache layout per layer: k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim].
With kv_cache_dtype="int8" the caches hold int8 codes and k_scale_cache, v_scale_cache
[num_blocks, block_size, num_kv_heads] fp32 hold the per-(token, head) scales (absmax / 127);
both backends quantize with `lmforge.kernels.reference.quantize_int8` semantics and attend to the
dequantized values, so they agree.
Token `pos` of a sequence lives in slot `block_table[pos // block_size] * block_size + pos % block_size`.

Per-layer score options, the same keywords on every backend and kernel (`reference.attention_scores`):
`sliding_window` (query i sees keys i - window < j <= i; table entries of blocks before the window
may already be reused by other sequences and are never attended to), `alibi_slopes` [H] fp32
(+ slope * (j - i)) and `logits_soft_cap` (cap * tanh(s / cap), before the mask). `scale` is the
layer's own softmax scale (head_dim ** -0.5 unless the model says otherwise).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class CommonAttentionMetadata:
    """One step's batch layout, backend-neutral. T = new tokens in the step, B = sequences."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot each new token's K/V is written to
    block_tables: torch.Tensor  # [B, max_blocks] int64, right-padded with 0 (never read past seq_len)
    query_lens: list[int]  # [B] new tokens per sequence (1 for decode)
    seq_lens: list[int]  # [B] context length after this step (cached + new)
    block_size: int
    # [T] int64: the prompt length of each new token's sequence, for the RoPE types that rotate by the
    # sequence length HF saw (longrope, dynamic; `RotaryEmbedding.forward`); None: not provided
    prompt_lens: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)


class AttentionBackend(ABC):
    """Also carries `ops`, the kernel set of the same family (norms, RoPE, activation, sampling), so a
    model built on a backend runs every op of a step on that backend."""

    name: str
    ops: Any  # lmforge.kernels.backend.Ops

    @abstractmethod
    def build_metadata(self, common: CommonAttentionMetadata) -> Any:
        """Called once per step, before the model; the result is handed to every layer."""

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: Any,
        scale: float,
        *,
        k_scale_cache: torch.Tensor | None = None,
        v_scale_cache: torch.Tensor | None = None,
        sliding_window: int | None = None,
        alibi_slopes: torch.Tensor | None = None,
        logits_soft_cap: float | None = None,
    ) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] (new tokens) -> [T, H, D]; writes k/v into the cache first.
        With scale caches given (int8 KV cache), k/v are quantized on write and dequantized on read.
        sliding_window / alibi_slopes / logits_soft_cap: this layer's score options (module docstring)."""


@dataclass(slots=True)
class TorchAttentionMetadata:
    slot_mapping: torch.Tensor  # [T]
    num_tokens: int
    # Sequences with one new token (decode), batched: gathered K/V padded to the longest context.
    decode_token_idx: torch.Tensor | None  # [Bd] row of each decode token in the flattened batch
    decode_slots: torch.Tensor | None  # [Bd, S] cache slot of every context position
    decode_positions: torch.Tensor | None  # [Bd, 1] position of each decode token (seq_len - 1)
    # Sequences with several new tokens (prefill chunks), one at a time:
    # (first token row, query_len, seq_len, slots [seq_len] or None when nothing was cached before).
    prefills: list[tuple[int, int, int, torch.Tensor | None]]
    prompt_lens: torch.Tensor | None = None  # [T], CommonAttentionMetadata.prompt_lens


class TorchAttentionBackend(AttentionBackend):
    """Reference paged attention with torch SDPA: works on any device, favours clarity."""

    name = "torch"

    def __init__(self, device: torch.device | str = "cpu"):
        from lmforge.kernels.backend import get_ops

        self.ops = get_ops(device, "torch")

    def build_metadata(self, common: CommonAttentionMetadata) -> TorchAttentionMetadata:
        device, bs = common.slot_mapping.device, common.block_size
        starts, start = [], 0
        for qlen in common.query_lens:
            starts.append(start)
            start += qlen
        decode = [b for b, qlen in enumerate(common.query_lens) if qlen == 1]
        prefills = []
        for b, qlen in enumerate(common.query_lens):
            if qlen > 1:
                seq_len = common.seq_lens[b]
                slots = None if seq_len == qlen else _slots(common.block_tables[b : b + 1], seq_len, bs)[0]
                prefills.append((starts[b], qlen, seq_len, slots))
        decode_token_idx = decode_slots = decode_positions = None
        if decode:
            rows = torch.tensor(decode, device=device)
            lens = torch.tensor([common.seq_lens[b] for b in decode], device=device)
            max_len = int(lens.max())
            decode_token_idx = torch.tensor([starts[b] for b in decode], device=device)
            decode_slots = _slots(common.block_tables[rows], max_len, bs)
            decode_positions = (lens - 1)[:, None]
        return TorchAttentionMetadata(
            common.slot_mapping,
            start,
            decode_token_idx,
            decode_slots,
            decode_positions,
            prefills,
            common.prompt_lens,
        )

    def forward(
        self,
        q,
        k,
        v,
        k_cache,
        v_cache,
        meta: TorchAttentionMetadata,
        scale,
        *,
        k_scale_cache=None,
        v_scale_cache=None,
        sliding_window=None,
        alibi_slopes=None,
        logits_soft_cap=None,
    ):
        num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
        k_flat = k_cache.view(-1, num_kv_heads, head_dim)  # [num_blocks * block_size, Hkv, D]
        v_flat = v_cache.view(-1, num_kv_heads, head_dim)
        if k_scale_cache is None:
            k_flat.index_copy_(0, meta.slot_mapping, k)
            v_flat.index_copy_(0, meta.slot_mapping, v)
            k_sc = v_sc = None
        else:  # int8: the kernels' reference quantization; attention sees what the cache holds
            k_sc, v_sc = k_scale_cache.view(-1, num_kv_heads), v_scale_cache.view(-1, num_kv_heads)
            k = _write_int8(k, k_flat, k_sc, meta.slot_mapping, q.dtype)
            v = _write_int8(v, v_flat, v_sc, meta.slot_mapping, q.dtype)
        options = ScoreOptions(scale, sliding_window, alibi_slopes, logits_soft_cap)
        out = torch.empty_like(q)
        if meta.decode_token_idx is not None:
            assert meta.decode_slots is not None and meta.decode_positions is not None  # set together
            qd = q[meta.decode_token_idx].unsqueeze(2)  # [Bd, H, 1, D]
            kd = _gather(k_flat, meta.decode_slots, k_sc, q.dtype).transpose(1, 2)  # [Bd, Hkv, S, D]
            vd = _gather(v_flat, meta.decode_slots, v_sc, q.dtype).transpose(1, 2)
            out[meta.decode_token_idx] = _sdpa(qd, kd, vd, meta.decode_positions, options).squeeze(2)
        for start, qlen, seq_len, slots in meta.prefills:
            qp = q[start : start + qlen].transpose(0, 1)[None]  # [1, H, qlen, D]
            if slots is None:  # fresh prompt: the new K/V are the whole context
                kp, vp = (
                    k[start : start + qlen].transpose(0, 1)[None],
                    v[start : start + qlen].transpose(0, 1)[None],
                )
            else:  # chunk after cached tokens: query i sits at position seq_len - qlen + i
                kp = _gather(k_flat, slots, k_sc, q.dtype).transpose(0, 1)[None]  # [1, Hkv, seq_len, D]
                vp = _gather(v_flat, slots, v_sc, q.dtype).transpose(0, 1)[None]
            q_pos = torch.arange(seq_len - qlen, seq_len, device=q.device)[None]  # [1, qlen]
            out[start : start + qlen] = _sdpa(qp, kp, vp, q_pos, options)[0].transpose(0, 1)
        return out


@dataclass(frozen=True, slots=True)
class ScoreOptions:
    """One layer's softmax scale and score options (module docstring)."""

    scale: float
    sliding_window: int | None = None
    alibi_slopes: torch.Tensor | None = None  # [H] fp32
    logits_soft_cap: float | None = None


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, o: ScoreOptions
) -> torch.Tensor:
    """q [B, H, Lq, D] at positions q_pos [B, Lq]; k/v [B, Hkv, S, D] at positions 0..S-1 -> [B, H, Lq, D].

    Causal (+ window) is SDPA with a bool mask. The soft cap sits between the product and the softmax,
    where SDPA has no hook, and an ALiBi bias reaches slope * context (thousands) where a 16-bit float mask
    would round it by whole units, so both are spelled out in fp32.
    """
    num_keys = k.shape[2]
    plain = o.sliding_window is None and o.alibi_slopes is None and o.logits_soft_cap is None
    if plain and q.shape[2] == num_keys:  # a fresh prompt: positions 0..S-1 on both sides
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=o.scale, enable_gqa=True)
    distance = (torch.arange(num_keys, device=q.device)[None, None, :] - q_pos[:, :, None])[
        :, None
    ]  # [B,1,Lq,S]
    visible = distance <= 0
    if o.sliding_window is not None:
        visible &= distance > -o.sliding_window
    if o.alibi_slopes is None and o.logits_soft_cap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=o.scale, enable_gqa=True)
    group = q.shape[1] // k.shape[1]
    scores = (
        q.float() @ k.float().repeat_interleave(group, dim=1).transpose(-1, -2) * o.scale
    )  # [B, H, Lq, S]
    if o.logits_soft_cap is not None:
        scores = o.logits_soft_cap * torch.tanh(scores / o.logits_soft_cap)
    if o.alibi_slopes is not None:
        scores = scores + o.alibi_slopes.float()[None, :, None, None] * distance
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return (probs @ v.float().repeat_interleave(group, dim=1)).to(q.dtype)


def _gather(
    flat_cache: torch.Tensor,
    slots: torch.Tensor,
    flat_scales: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """flat_cache [num_slots, Hkv, D], slots [...] -> [..., Hkv, D] (index_select: faster than indexing).
    With flat_scales [num_slots, Hkv] (int8 cache): dequantized (codes x scale, in fp32) and cast to dtype."""
    flat = slots.reshape(-1)
    x = flat_cache.index_select(0, flat)
    if flat_scales is not None:
        x = (x.float() * flat_scales.index_select(0, flat).unsqueeze(-1)).to(dtype)
    return x.view(*slots.shape, *flat_cache.shape[1:])


def _write_int8(
    x: torch.Tensor,
    flat_cache: torch.Tensor,
    flat_scales: torch.Tensor,
    slots: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Quantizes x [T, Hkv, D] per (token, head) like `reference.reshape_and_cache_int8`, writes codes and
    scales at slots, and returns the dequantized x (what a later read of those slots gives) in dtype."""
    from lmforge.kernels.reference import quantize_int8

    codes, scales = quantize_int8(x)
    flat_cache.index_copy_(0, slots, codes)
    flat_scales.index_copy_(0, slots, scales)
    return (codes.float() * scales.unsqueeze(-1)).to(dtype)


def _slots(block_tables: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """[B, max_blocks] block tables -> [B, length] flat cache slots of positions 0..length-1."""
    pos = torch.arange(length, device=block_tables.device)
    return block_tables[:, pos // block_size] * block_size + pos % block_size


@dataclass(slots=True)
class KernelAttentionMetadata:
    slot_mapping: torch.Tensor  # [T]
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32
    cu_seqlens_q: torch.Tensor  # [B+1] int32
    max_q_len: int
    decode_only: bool  # every sequence has exactly one new token
    prompt_lens: torch.Tensor | None = None  # [T], CommonAttentionMetadata.prompt_lens


class KernelAttentionBackend(AttentionBackend):
    """`lmforge.kernels` paged attention: Triton kernels on CUDA (on CPU only under TRITON_INTERPRET=1)."""

    name = "triton"

    def __init__(self, device: torch.device):
        from lmforge.kernels.backend import get_ops

        self.ops = get_ops(device, "triton")

    def build_metadata(self, common: CommonAttentionMetadata) -> KernelAttentionMetadata:
        device = common.slot_mapping.device
        cu = [0]
        for qlen in common.query_lens:
            cu.append(cu[-1] + qlen)
        return KernelAttentionMetadata(
            slot_mapping=common.slot_mapping,
            block_tables=common.block_tables.to(torch.int32).contiguous(),
            seq_lens=torch.tensor(common.seq_lens, dtype=torch.int32, device=device),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
            max_q_len=max(common.query_lens),
            decode_only=all(qlen == 1 for qlen in common.query_lens),
            prompt_lens=common.prompt_lens,
        )

    def forward(
        self,
        q,
        k,
        v,
        k_cache,
        v_cache,
        meta: KernelAttentionMetadata,
        scale,
        *,
        k_scale_cache=None,
        v_scale_cache=None,
        sliding_window=None,
        alibi_slopes=None,
        logits_soft_cap=None,
    ):
        if k_scale_cache is None:
            self.ops.reshape_and_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        else:
            self.ops.reshape_and_cache_int8(
                k, v, k_cache, v_cache, k_scale_cache, v_scale_cache, meta.slot_mapping
            )
        kwargs = {
            "k_scale_cache": k_scale_cache,
            "v_scale_cache": v_scale_cache,
            "sliding_window": sliding_window,
            "alibi_slopes": alibi_slopes,
            "logits_soft_cap": logits_soft_cap,
        }
        if meta.decode_only:
            return self.ops.paged_decode_attention(
                q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, **kwargs
            )
        return self.ops.paged_prefill_attention(
            q,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.seq_lens,
            meta.cu_seqlens_q,
            meta.max_q_len,
            scale,
            **kwargs,
        )


_BACKENDS = {"torch": TorchAttentionBackend, "triton": KernelAttentionBackend}


def get_attention_backend(name: str = "torch", device: torch.device | str = "cpu") -> AttentionBackend:
    """The one switch. "torch": SDPA reference (any device, the CPU default); "triton": the
    lmforge.kernels Triton kernels (the CUDA default); "auto": by device type."""
    device = torch.device(device)
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name not in _BACKENDS:
        raise ValueError(
            f"unknown attention backend {name!r}; available: auto, {', '.join(sorted(_BACKENDS))}"
        )
    return _BACKENDS[name](device)


def register_attention_backend(name: str, factory: Any) -> None:
    """factory(device) -> AttentionBackend."""
    _BACKENDS[name] = factory
