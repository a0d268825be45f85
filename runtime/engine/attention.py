"""Paged attention behind one interface.

The model runner describes a step once (`CommonAttentionMetadata`: which tokens belong to which
sequence, where their K/V go, each sequence's block table); the chosen backend turns that into
its own metadata once per step (`build_metadata`) and then runs every layer (`forward`). The torch
backend calls `lmforge.kernels.reference`, the one torch spec the Triton kernels are tested against
(so CPU runs the semantics CUDA runs); `KernelAttentionBackend` runs the Triton kernels;
`get_attention_backend` picks one without touching the models. The interface itself
(`AttentionBackend`) lives with the models that call it (`runtime/models/attention_backend.py`).

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

from dataclasses import dataclass, field
from typing import Any

import torch

from lmforge.kernels import reference
from lmforge.runtime.models.attention_backend import AttentionBackend

__all__ = [
    "AttentionBackend",
    "CommonAttentionMetadata",
    "KernelAttentionBackend",
    "TorchAttentionBackend",
    "get_attention_backend",
    "register_attention_backend",
]


@dataclass(slots=True)
class CommonAttentionMetadata:
    """One step's batch layout, backend-neutral. T = new tokens in the step, B = sequences."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot each new token's K/V is written to
    block_tables: torch.Tensor  # [B, max_blocks] int32, right-padded with 0 (never read past seq_len)
    query_lens: list[int]  # [B] new tokens per sequence (1 for decode)
    seq_lens: list[int]  # [B] context length after this step (cached + new)
    block_size: int
    # [T] int64: the prompt length of each new token's sequence, for the RoPE types that rotate by the
    # sequence length HF saw (longrope, dynamic; `RotaryEmbedding.forward`); None: not provided
    prompt_lens: torch.Tensor | None = None
    seq_lens_tensor: torch.Tensor | None = None  # [B] int32 on the device (None: built from seq_lens)
    query_start_loc: torch.Tensor | None = None  # [B+1] int32 cumulative query_lens (None: built)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    def device_seq_lens(self) -> torch.Tensor:
        if self.seq_lens_tensor is None:
            self.seq_lens_tensor = torch.tensor(
                self.seq_lens, dtype=torch.int32, device=self.slot_mapping.device
            )
        return self.seq_lens_tensor

    def device_query_start_loc(self) -> torch.Tensor:
        if self.query_start_loc is None:
            cu = [0]
            for qlen in self.query_lens:
                cu.append(cu[-1] + qlen)
            self.query_start_loc = torch.tensor(cu, dtype=torch.int32, device=self.slot_mapping.device)
        return self.query_start_loc


@dataclass(slots=True)
class TorchAttentionMetadata:
    """The step split the way `reference` attends: one-token sequences through the batched
    `paged_decode_attention`, the others through the varlen `paged_prefill_attention`."""

    slot_mapping: torch.Tensor  # [T]
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32
    decode_rows: torch.Tensor | None  # [Bd] row of each one-token sequence in the batch; None: no decode
    decode_tokens: torch.Tensor | None  # [Bd] its token row in the flattened batch (None: rows == tokens)
    prefill_rows: torch.Tensor | None  # [Bp] sequences with several new tokens; None: none
    prefill_tokens: torch.Tensor | None  # [Tp] their token rows, in order
    prefill_cu_seqlens: torch.Tensor | None  # [Bp + 1] int32 over prefill_tokens
    max_prefill_len: int
    prompt_lens: torch.Tensor | None = None  # [T], CommonAttentionMetadata.prompt_lens
    query_lens: list[int] = field(default_factory=list)  # [B] host (MLA walks the batch per sequence)


class TorchAttentionBackend(AttentionBackend):
    """The kernels' torch reference (`lmforge.kernels.reference`) behind the backend interface: the CPU
    path runs the same paged attention the Triton kernels are tested against."""

    name = "torch"

    def __init__(self, device: torch.device | str = "cpu"):
        from lmforge.kernels.backend import get_ops

        self.ops = get_ops(device, "torch")

    def build_metadata(self, common: CommonAttentionMetadata) -> TorchAttentionMetadata:
        device = common.slot_mapping.device
        query_lens = common.query_lens
        seq_lens = common.device_seq_lens()
        decode_rows = decode_tokens = prefill_rows = prefill_tokens = prefill_cu = None
        max_prefill = 0
        if all(n == 1 for n in query_lens):  # every row one token: rows and tokens coincide
            decode_rows = torch.arange(len(query_lens), device=device)
        else:
            starts, start = [], 0
            for n in query_lens:
                starts.append(start)
                start += n
            decode = [b for b, n in enumerate(query_lens) if n == 1]
            prefill = [b for b, n in enumerate(query_lens) if n > 1]
            if decode:
                decode_rows = torch.tensor(decode, device=device)
                decode_tokens = torch.tensor([starts[b] for b in decode], device=device)
            prefill_rows = torch.tensor(prefill, device=device)
            tokens: list[int] = []
            cu = [0]
            for b in prefill:
                tokens.extend(range(starts[b], starts[b] + query_lens[b]))
                cu.append(len(tokens))
            prefill_tokens = torch.tensor(tokens, device=device)
            prefill_cu = torch.tensor(cu, dtype=torch.int32, device=device)
            max_prefill = max(query_lens[b] for b in prefill)
        return TorchAttentionMetadata(
            slot_mapping=common.slot_mapping,
            block_tables=common.block_tables,
            seq_lens=seq_lens,
            decode_rows=decode_rows,
            decode_tokens=decode_tokens,
            prefill_rows=prefill_rows,
            prefill_tokens=prefill_tokens,
            prefill_cu_seqlens=prefill_cu,
            max_prefill_len=max_prefill,
            prompt_lens=common.prompt_lens,
            query_lens=common.query_lens,
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
        if k_scale_cache is None:
            reference.reshape_and_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        else:
            reference.reshape_and_cache_int8(
                k, v, k_cache, v_cache, k_scale_cache, v_scale_cache, meta.slot_mapping
            )
        kwargs: dict[str, Any] = {
            "k_scale_cache": k_scale_cache,
            "v_scale_cache": v_scale_cache,
            "sliding_window": sliding_window,
            "alibi_slopes": alibi_slopes,
            "logits_soft_cap": logits_soft_cap,
        }
        if meta.prefill_rows is None and meta.decode_tokens is None:  # decode only
            return reference.paged_decode_attention(
                q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, **kwargs
            )
        out = torch.empty_like(q)
        if meta.decode_rows is not None:
            rows = meta.decode_rows
            out[meta.decode_tokens] = reference.paged_decode_attention(
                q[meta.decode_tokens],
                k_cache,
                v_cache,
                meta.block_tables[rows],
                meta.seq_lens[rows],
                scale,
                **kwargs,
            )
        if meta.prefill_rows is not None:
            rows, tokens = meta.prefill_rows, meta.prefill_tokens
            assert meta.prefill_cu_seqlens is not None  # set with prefill_rows
            out[tokens] = reference.paged_prefill_attention(
                q[tokens],
                k_cache,
                v_cache,
                meta.block_tables[rows],
                meta.seq_lens[rows],
                meta.prefill_cu_seqlens,
                meta.max_prefill_len,
                scale,
                **kwargs,
            )
        return out


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
        return KernelAttentionMetadata(
            slot_mapping=common.slot_mapping,
            block_tables=common.block_tables.to(torch.int32).contiguous(),
            seq_lens=common.device_seq_lens(),
            cu_seqlens_q=common.device_query_start_loc(),
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
