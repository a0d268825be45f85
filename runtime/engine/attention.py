"""Paged attention behind one interface.

The model runner describes a step once (`CommonAttentionMetadata`: which tokens belong to which
sequence, where their K/V go, each sequence's block table); the chosen backend turns that into
its own metadata once per step (`build_metadata`) and then runs every layer (`forward`). The torch
backend here is the readable reference that runs on CPU; a Triton backend plugs in through
`get_attention_backend` without touching the models.

KV cache layout per layer: k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim].
Token `pos` of a sequence lives in slot `block_table[pos // block_size] * block_size + pos % block_size`.
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

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)


class AttentionBackend(ABC):
    name: str

    @abstractmethod
    def build_metadata(self, common: CommonAttentionMetadata) -> Any:
        """Called once per step, before the model; the result is handed to every layer."""

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: Any, scale: float) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] (new tokens) -> [T, H, D]; writes k/v into the cache first."""


@dataclass(slots=True)
class TorchAttentionMetadata:
    slot_mapping: torch.Tensor  # [T]
    num_tokens: int
    # Sequences with one new token (decode), batched: gathered K/V padded to the longest context.
    decode_token_idx: torch.Tensor | None  # [Bd] row of each decode token in the flattened batch
    decode_slots: torch.Tensor | None  # [Bd, S] cache slot of every context position
    decode_mask: torch.Tensor | None  # [Bd, 1, 1, S] True where position < seq_len
    # Sequences with several new tokens (prefill chunks), one at a time:
    # (first token row, query_len, seq_len, slots [seq_len] or None when nothing was cached before).
    prefills: list[tuple[int, int, int, torch.Tensor | None]]


class TorchAttentionBackend(AttentionBackend):
    """Reference paged attention with torch SDPA: works on any device, favours clarity."""

    name = "torch"

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
        decode_token_idx = decode_slots = decode_mask = None
        if decode:
            rows = torch.tensor(decode, device=device)
            lens = torch.tensor([common.seq_lens[b] for b in decode], device=device)
            max_len = int(lens.max())
            decode_token_idx = torch.tensor([starts[b] for b in decode], device=device)
            decode_slots = _slots(common.block_tables[rows], max_len, bs)
            decode_mask = (torch.arange(max_len, device=device)[None, :] < lens[:, None])[:, None, None, :]
        return TorchAttentionMetadata(common.slot_mapping, start, decode_token_idx, decode_slots,
                                      decode_mask, prefills)

    def forward(self, q, k, v, k_cache, v_cache, meta: TorchAttentionMetadata, scale):
        num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
        k_flat = k_cache.view(-1, num_kv_heads, head_dim)  # [num_blocks * block_size, Hkv, D]
        v_flat = v_cache.view(-1, num_kv_heads, head_dim)
        k_flat.index_copy_(0, meta.slot_mapping, k)
        v_flat.index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)
        if meta.decode_token_idx is not None:
            qd = q[meta.decode_token_idx].unsqueeze(2)  # [Bd, H, 1, D]
            kd = k_flat[meta.decode_slots].transpose(1, 2)  # [Bd, Hkv, S, D]
            vd = v_flat[meta.decode_slots].transpose(1, 2)
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, scale=scale,
                                                enable_gqa=True)
            out[meta.decode_token_idx] = od.squeeze(2)
        for start, qlen, seq_len, slots in meta.prefills:
            qp = q[start : start + qlen].transpose(0, 1)  # [H, qlen, D]
            if slots is None:  # fresh prompt: the new K/V are the whole context
                kp, vp = k[start : start + qlen].transpose(0, 1), v[start : start + qlen].transpose(0, 1)
                op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=True)
            else:  # chunk after cached tokens: query i sits at position seq_len - qlen + i
                kp, vp = k_flat[slots].transpose(0, 1), v_flat[slots].transpose(0, 1)  # [Hkv, seq_len, D]
                q_pos = torch.arange(seq_len - qlen, seq_len, device=q.device)
                mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]  # [qlen, seq_len]
                op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale, enable_gqa=True)
            out[start : start + qlen] = op.transpose(0, 1)
        return out


def _slots(block_tables: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """[B, max_blocks] block tables -> [B, length] flat cache slots of positions 0..length-1."""
    pos = torch.arange(length, device=block_tables.device)
    return block_tables[:, pos // block_size] * block_size + pos % block_size


_BACKENDS: dict[str, type[AttentionBackend]] = {"torch": TorchAttentionBackend}


def get_attention_backend(name: str = "torch") -> AttentionBackend:
    """The one switch: "torch" today; a Triton backend registers itself here."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {sorted(_BACKENDS)}")
    return _BACKENDS[name]()


def register_attention_backend(name: str, cls: type[AttentionBackend]) -> None:
    _BACKENDS[name] = cls
