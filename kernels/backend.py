"""The one kernel switch the engine uses: `ops = get_ops(device)`, then `ops.rms_norm(...)`, `ops.rope(...)`...

Backends (same signatures, same results within dtype tolerance):
    "torch"  - `reference.py`: readable torch, any device; the CPU default.
    "triton" - the fused kernels in this package; the CUDA default. On CPU only under TRITON_INTERPRET=1
               (the Triton interpreter, slow: for tests).
Choice: the `backend` argument, else $LMFORGE_KERNEL_BACKEND (torch | triton), else by device type.
Importing this module (and the torch backend) never imports triton.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

BACKENDS = ("torch", "triton")
ENV_VAR = "LMFORGE_KERNEL_BACKEND"


@dataclass(frozen=True, slots=True)
class Ops:
    """Kernel entry points; see `reference.py` for the shapes and semantics of each."""

    name: str
    rms_norm: Callable  # (x, weight, eps) -> out
    fused_add_rms_norm: Callable  # (x, residual, weight, eps) -> (out, new_residual)
    rope: Callable  # (positions, q, k, cos_sin_cache, is_neox_style=True) -> (q, k), in place
    silu_and_mul: Callable  # (x [..., 2I]) -> [..., I]
    reshape_and_cache: Callable  # (key, value, k_cache, v_cache, slot_mapping) -> None
    reshape_and_cache_int8: (
        Callable  # (key, value, k_cache, v_cache, k_scale_cache, v_scale_cache, slot_mapping)
    )
    paged_decode_attention: Callable  # (q, k_cache, v_cache, block_tables, seq_lens, scale, *, k_scale_cache,
    #          v_scale_cache, sliding_window, alibi_slopes, logits_soft_cap, num_splits) -> out
    paged_prefill_attention: (
        Callable  # (q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q, max_q_len,
    )
    #          scale, *, k_scale_cache, v_scale_cache, sliding_window, alibi_slopes, logits_soft_cap) -> out
    # (per-layer score options of both: reference.attention_scores)
    sample: Callable  # (logits, temperature, top_k, top_p, min_p, uniform, generator) -> token ids int64
    quant_linear: Callable  # (x, weight_packed, weight_scale, bits, bias) -> y
    lora_shrink: Callable  # (x [T, K], lora_a [S, R, K], token_slots [T]) -> [T, R]
    lora_expand: (
        Callable  # (y [T, N], buf [T, R], lora_b [S, N, R], token_slots, scales [S]) -> None, in place
    )
    fused_moe: Callable  # (x, w13, w2, topk_weights, topk_ids, activation) -> y (moe_reference.fused_moe)
    fused_moe_quant: (
        Callable  # (x, w13_packed, w13_scale, w2_packed, w2_scale, bits, topk_weights, topk_ids, act)
    )


def resolve_backend(device: torch.device | str, backend: str | None = None) -> str:
    device = torch.device(device)
    name = backend or os.environ.get(ENV_VAR) or ("triton" if device.type == "cuda" else "torch")
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(
            f"unknown kernel backend {name!r} (from {ENV_VAR} or argument); expected one of {BACKENDS}"
        )
    if name == "triton" and device.type != "cuda":
        from ._interp import interpreting

        if not interpreting():
            raise ValueError(
                f"the triton kernel backend needs a CUDA device (got {device}); on CPU set TRITON_INTERPRET=1 "
                f"to run the kernels in the Triton interpreter, or use {ENV_VAR}=torch"
            )
    return name


def get_ops(device: torch.device | str, backend: str | None = None) -> Ops:
    return _load(resolve_backend(device, backend))


@functools.cache
def _load(name: str) -> Ops:
    if name == "torch":
        from . import moe_reference
        from . import reference as r

        return Ops(
            name="torch",
            rms_norm=r.rms_norm,
            fused_add_rms_norm=r.fused_add_rms_norm,
            rope=r.rope,
            silu_and_mul=r.silu_and_mul,
            reshape_and_cache=r.reshape_and_cache,
            reshape_and_cache_int8=r.reshape_and_cache_int8,
            paged_decode_attention=r.paged_decode_attention,
            paged_prefill_attention=r.paged_prefill_attention,
            sample=r.sample,
            quant_linear=r.quant_linear,
            lora_shrink=r.lora_shrink,
            lora_expand=r.lora_expand,
            fused_moe=moe_reference.fused_moe,
            fused_moe_quant=moe_reference.fused_moe_quant,
        )
    from ._interp import interpreting, patch_bf16

    if interpreting():
        patch_bf16()
    from .activation import silu_and_mul
    from .decode_attention import paged_decode_attention
    from .fused_moe import fused_moe, fused_moe_quant
    from .kv_cache import reshape_and_cache, reshape_and_cache_int8
    from .lora import lora_expand, lora_shrink
    from .prefill_attention import paged_prefill_attention
    from .quant_gemm import quant_linear
    from .rmsnorm import fused_add_rms_norm, rms_norm
    from .rope import rope
    from .sampling import sample

    return Ops(
        name="triton",
        rms_norm=rms_norm,
        fused_add_rms_norm=fused_add_rms_norm,
        rope=rope,
        silu_and_mul=silu_and_mul,
        reshape_and_cache=reshape_and_cache,
        reshape_and_cache_int8=reshape_and_cache_int8,
        paged_decode_attention=paged_decode_attention,
        paged_prefill_attention=paged_prefill_attention,
        sample=sample,
        quant_linear=quant_linear,
        lora_shrink=lora_shrink,
        lora_expand=lora_expand,
        fused_moe=fused_moe,
        fused_moe_quant=fused_moe_quant,
    )
