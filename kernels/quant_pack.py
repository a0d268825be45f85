"""compressed-tensors `pack-quantized` int weights: pack, unpack, dequantize (torch only).

Layout (see shared notes quant-format.md): symmetric int `bits`-bit codes q in [-2^(bits-1), 2^(bits-1))
stored unsigned u = q + 2^(bits-1), packed along the input dim into int32 words: element i of a row
sits at bits [i*bits, (i+1)*bits) of word i*bits//32 (element 0 is the least-significant field).

    weight_packed [out, ceil(in*bits/32)] int32
    weight_scale  [out, in/group_size] model dtype (per-channel: [out, 1])
    W[n, k] = q[n, k] * weight_scale[n, k // group_size]   (product rounded to the scale dtype)
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 4, 8)


def _check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    return 32 // bits  # fields per int32 word


def pack_int_weights(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q [out, in] signed ints in [-2^(bits-1), 2^(bits-1)) -> packed [out, ceil(in*bits/32)] int32."""
    per_word = _check_bits(bits)
    assert q.dim() == 2, f"expected [out, in], got {tuple(q.shape)}"
    q = q.to(torch.int64)
    half = 1 << (bits - 1)
    if q.numel() and (q.min() < -half or q.max() >= half):
        raise ValueError(f"values out of range for int{bits}: [{int(q.min())}, {int(q.max())}]")
    out_features, in_features = q.shape
    num_words = -(-in_features // per_word)
    u = torch.zeros(out_features, num_words * per_word, dtype=torch.int64, device=q.device)
    u[:, :in_features] = q + half  # padding fields hold u = 0
    shifts = torch.arange(per_word, device=q.device, dtype=torch.int64) * bits
    words = (u.view(out_features, num_words, per_word) << shifts).sum(-1)  # in [0, 2^32)
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as two's complement int32
    return words.to(torch.int32)


def unpack_int_weights(packed: torch.Tensor, bits: int, shape: tuple[int, int] | torch.Size) -> torch.Tensor:
    """packed [out, words] int32 -> q [out, in] int8 (shape = (out, in), the checkpoint's weight_shape)."""
    per_word = _check_bits(bits)
    out_features, in_features = (int(s) for s in shape)
    assert packed.dtype == torch.int32 and packed.dim() == 2, (
        f"expected int32 [out, words], got {packed.dtype}"
    )
    assert packed.shape == (out_features, -(-in_features // per_word)), (
        f"{tuple(packed.shape)} vs shape {shape}"
    )
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per_word, device=packed.device, dtype=torch.int64) * bits
    u = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [out, words, per_word]
    q = u.reshape(out_features, -1)[:, :in_features] - (1 << (bits - 1))
    return q.to(torch.int8)


def dequantize_weight(
    packed: torch.Tensor, scale: torch.Tensor, bits: int, shape: tuple[int, int] | torch.Size
) -> torch.Tensor:
    """W [out, in] in scale.dtype: q * scale, one scale per (row, group of in_features/num_groups columns)."""
    q = unpack_int_weights(packed, bits, shape)
    out_features, in_features = q.shape
    num_groups = scale.shape[1]
    assert scale.shape[0] == out_features and in_features % num_groups == 0, f"scale {tuple(scale.shape)}"
    group_size = in_features // num_groups
    return q.to(scale.dtype) * scale.repeat_interleave(group_size, dim=1)
