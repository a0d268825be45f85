"""Round-to-nearest building blocks shared by every scheme.

Symmetric int (compressed-tensors' min-max convention, quant-format.md):
    scale[n, g] = absmax(W[n, g*G:(g+1)*G]) / ((2^bits - 1) / 2)      (int4: /7.5, int8: /127.5)
    q = clamp(round(W / scale), -2^(bits-1), 2^(bits-1) - 1)
    W_hat = q * scale, computed in the scale dtype (what transformers, vLLM and our engine do)
The scale is rounded UP to its stored dtype, so |W / scale| <= 2^(bits-1) - 1/2 still holds and every
element's error is at most scale / 2 (the clamp costs exactly half a step at +absmax).

FP8 e4m3: per output channel scale = absmax / 448, W8 = clamp(W / scale, +-448) cast to float8_e4m3fn.
Activations (fp8 dynamic): the same per token, at run time.
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


def int_range(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def store_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 scales -> `dtype`, never rounded down (see module doc), never zero."""
    stored = scale.to(dtype)
    low = stored.float() < scale
    if low.any():  # x * (1 + eps) >= x + ulp(x): rounds to at least the next representable value
        stored = torch.where(low, (stored.float() * (1 + torch.finfo(dtype).eps)).to(dtype), stored)
    return stored.clamp_min(torch.finfo(dtype).tiny)


def int_scales(w: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """w [out, in] -> scale [out, in / group_size] in `dtype` (group_size -1: [out, 1], per channel)."""
    out_features, in_features = w.shape
    group = in_features if group_size <= 0 else group_size
    if in_features % group:
        raise ValueError(f"in_features {in_features} is not a multiple of the group size {group}")
    absmax = w.float().abs().view(out_features, in_features // group, group).amax(-1)
    return store_scale(absmax / ((2**bits - 1) / 2), dtype)


def expand_scale(scale: torch.Tensor, in_features: int) -> torch.Tensor:
    """[out, groups] -> [out, in]: column k uses scale[:, k // (in / groups)]."""
    return scale.repeat_interleave(in_features // scale.shape[1], dim=1)


def quantize_int(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """w [out, in], scale [out, groups] -> q [out, in] int8 codes (round half to even, as torch.round)."""
    low, high = int_range(bits)
    q = torch.round(w.float() / expand_scale(scale.float(), w.shape[1])).clamp(low, high)
    return q.to(torch.int8)


def dequantize_int(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q [out, in] codes, scale [out, groups] -> W_hat [out, in] in scale.dtype."""
    return q.to(scale.dtype) * expand_scale(scale, q.shape[1])


def rtn_int(
    w: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [out, in] int8, scale [out, groups] dtype) by round-to-nearest."""
    scale = int_scales(w, bits, group_size, dtype)
    return quantize_int(w, scale, bits), scale


def quantize_fp8(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (w8 [out, in] float8_e4m3fn, scale [out, 1] in `dtype`)."""
    scale = store_scale(w.float().abs().amax(-1, keepdim=True) / FP8_MAX, dtype)
    w8 = (w.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return w8, scale


def dequantize_fp8(w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return w8.to(scale.dtype) * scale


def fake_quant_fp8_tokens(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token fp8 activations: x [..., K] -> x rounded through e4m3 with scale absmax / 448
    per row, back in x.dtype (all-zero rows stay zero)."""
    xf = x.float()
    scale = (xf.abs().amax(-1, keepdim=True) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    x8 = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return (x8.float() * scale).to(x.dtype)
