"""Token sampling on the GPU without sorting the vocabulary: one program per row.

    greedy (temperature 0): argmax of the raw logits (first index on ties), one pass.
    otherwise, on s = logits / temperature:
      top-k: the k-th largest s, found by a 17-ary search over the order-preserving int32 key of s
             (16 pivots counted per pass over the row: ~8 passes for 32-bit keys);
      top-p: the same search for the smallest key whose strictly-larger mass is < top_p * Z
             (Z = sum of exp(s - max) over the top-k survivors), so top-p applies after top-k;
      min-p: s >= max + log(min_p);
      then Gumbel-max over the survivors: argmax(s + g), g = -log(-log(u)), u ~ U[0, 1) given [B, V]
      (exact categorical sampling from softmax(s) restricted to the survivors; no softmax, no sort).
Ties at a threshold are kept (all tokens equal to the k-th largest survive). Each row reads its logits
1 + 8 (top-k) + 9 (top-p) + 1 times at most, from L2 for usual vocab sizes.
Reference: `reference.sample` / `reference.sampling_mask`. The wrapper never reads device values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NUM_PIVOTS = 16
NEG_INF_KEY = tl.constexpr(-2139095041)  # _order_key(-inf)


@triton.jit
def _order_key(x):
    """fp32 -> int32 with the same order (negative floats: flip the magnitude bits)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _key_to_float(key):
    bits = tl.where(key >= 0, key, key ^ 0x7FFFFFFF).to(tl.int32)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _pivots(lo, hi, NUM_PIVOTS: tl.constexpr):
    """NUM_PIVOTS evenly spaced int64 keys in (lo, hi) (those >= hi are to be ignored)."""
    step = (hi - lo + NUM_PIVOTS) // (NUM_PIVOTS + 1)
    return lo + (tl.arange(0, NUM_PIVOTS) + 1).to(tl.int64) * step


@triton.jit
def _sample_kernel(  # noqa: C901 - one Triton program: its passes share the row's registers and loads
    logits_ptr, uniform_ptr, inv_temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, out_ptr, cut_ptr,
    stride_l, stride_u, vocab,
    HAS_MIN_P: tl.constexpr, BLOCK_V: tl.constexpr, NUM_PIVOTS: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    row_logits = logits_ptr + row * stride_l
    offs = tl.arange(0, BLOCK_V)
    inv_t = tl.load(inv_temp_ptr + row)

    # Pass 1: max and first argmax of the raw logits.
    best = tl.full([], float("-inf"), tl.float32)
    best_idx = tl.full([], 0, tl.int32)
    for start in range(0, vocab, BLOCK_V):
        x = tl.load(row_logits + start + offs, mask=start + offs < vocab, other=float("-inf")).to(tl.float32)
        chunk_best = tl.max(x, axis=0)
        chunk_idx = tl.argmax(x, axis=0, tie_break_left=True)
        best_idx = tl.where(chunk_best > best, start + chunk_idx, best_idx)
        best = tl.maximum(best, chunk_best)

    if inv_t == 0.0:  # greedy
        tl.store(out_ptr + row, best_idx.to(tl.int64))
        tl.store(cut_ptr + row, float("-inf"))
    else:
        s_max = best * inv_t  # max of s: scaling by inv_t > 0 is monotone
        max_key = _order_key(s_max).to(tl.int64)

        # top-k: largest key t with count(key >= t) >= k; lo satisfies it, hi does not.
        k = tl.load(top_k_ptr + row)
        k_cut = tl.full([], -(2**31) - 1, tl.int64)  # below every key: keep all
        if (k > 0) & (k < vocab):
            lo = k_cut
            hi = max_key + 1
            while hi - lo > 1:
                pivots = _pivots(lo, hi, NUM_PIVOTS)
                counts = tl.zeros([NUM_PIVOTS], tl.int32)
                for start in range(0, vocab, BLOCK_V):
                    mask = start + offs < vocab
                    x = tl.load(row_logits + start + offs, mask=mask, other=0.0).to(tl.float32)
                    key = _order_key(x * inv_t)
                    hit = (key[:, None] >= pivots[None, :]) & mask[:, None]
                    counts += tl.sum(hit.to(tl.int32), axis=0)
                valid = pivots < hi
                ok = (counts >= k) & valid
                lo, hi = (
                    tl.max(tl.where(ok, pivots, lo), axis=0),
                    tl.min(tl.where(valid & ~ok, pivots, hi), axis=0),
                )
            k_cut = lo

        # top-p over the top-k survivors: smallest key t with mass(key > t) < top_p * Z.
        top_p = tl.load(top_p_ptr + row)
        p_cut = k_cut
        if top_p < 1.0:
            z = tl.full([], 0.0, tl.float32)
            for start in range(0, vocab, BLOCK_V):
                mask = start + offs < vocab
                s = tl.load(row_logits + start + offs, mask=mask, other=0.0).to(tl.float32) * inv_t
                z += tl.sum(tl.where(mask & (_order_key(s) >= k_cut), tl.exp(s - s_max), 0.0), axis=0)
            target = top_p * z
            lo = k_cut - 1
            hi = max_key
            while hi - lo > 1:
                pivots = _pivots(lo, hi, NUM_PIVOTS)
                mass = tl.zeros([NUM_PIVOTS], tl.float32)
                for start in range(0, vocab, BLOCK_V):
                    mask = start + offs < vocab
                    s = tl.load(row_logits + start + offs, mask=mask, other=0.0).to(tl.float32) * inv_t
                    key = _order_key(s)
                    e = tl.where(mask & (key >= k_cut), tl.exp(s - s_max), 0.0)
                    mass += tl.sum(tl.where(key[:, None] > pivots[None, :], e[:, None], 0.0), axis=0)
                valid = pivots < hi
                ok = (mass < target) & valid
                lo, hi = (
                    tl.max(tl.where(valid & ~ok, pivots, lo), axis=0),
                    tl.min(tl.where(ok, pivots, hi), axis=0),
                )
            p_cut = hi

        cut = tl.maximum(k_cut, p_cut)
        if HAS_MIN_P:
            min_p = tl.load(min_p_ptr + row)
            min_s = tl.where(min_p > 0, s_max + tl.log(tl.where(min_p > 0, min_p, 1.0)), float("-inf"))
            cut = tl.maximum(cut, _order_key(min_s).to(tl.int64))

        # Gumbel-max over the survivors.
        best = tl.full([], float("-inf"), tl.float32)
        best_idx = tl.full([], 0, tl.int32)
        for start in range(0, vocab, BLOCK_V):
            mask = start + offs < vocab
            s = tl.load(row_logits + start + offs, mask=mask, other=0.0).to(tl.float32) * inv_t
            u = tl.load(uniform_ptr + row * stride_u + start + offs, mask=mask, other=0.5).to(tl.float32)
            score = tl.where(mask & (_order_key(s) >= cut), s - tl.log(-tl.log(u)), float("-inf"))
            chunk_best = tl.max(score, axis=0)
            chunk_idx = tl.argmax(score, axis=0, tie_break_left=True)
            best_idx = tl.where(chunk_best > best, start + chunk_idx, best_idx)
            best = tl.maximum(best, chunk_best)
        tl.store(out_ptr + row, best_idx.to(tl.int64))
        tl.store(cut_ptr + row, _key_to_float(tl.maximum(cut, NEG_INF_KEY)))


def sample_with_threshold(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    min_p: torch.Tensor | None = None,
    uniform: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample` plus the per-row threshold [B] fp32 on s = logits / temperature (kept: s >= threshold;
    -inf for greedy rows and rows without filtering)."""
    assert logits.dim() == 2 and logits.stride(1) == 1, (logits.shape, logits.stride())
    batch, vocab = logits.shape
    device = logits.device
    assert temperature.shape == (batch,), temperature.shape
    for name, t in (("top_k", top_k), ("top_p", top_p), ("min_p", min_p)):
        assert t is None or (t.shape == (batch,) and t.device == device), (
            f"{name} must be [batch] on {device}"
        )
    inv_temp = torch.where(temperature > 0, 1.0 / temperature.float(), 0.0).float()
    top_k = torch.zeros(batch, dtype=torch.int32, device=device) if top_k is None else top_k.to(torch.int32)
    top_p = torch.ones(batch, dtype=torch.float32, device=device) if top_p is None else top_p.float()
    min_p_arg = top_p if min_p is None else min_p.float()
    if uniform is None:
        uniform = torch.rand(batch, vocab, device=device, generator=generator)
    assert uniform.shape == (batch, vocab) and uniform.stride(1) == 1, uniform.shape
    out = torch.empty(batch, dtype=torch.int64, device=device)
    cut = torch.empty(batch, dtype=torch.float32, device=device)
    if batch:
        block_v = 1024 if logits.is_cuda else 64
        _sample_kernel[(batch,)](
            logits, uniform, inv_temp, top_k, top_p, min_p_arg, out, cut,
            logits.stride(0), uniform.stride(0), vocab,
            HAS_MIN_P=min_p is not None, BLOCK_V=block_v, NUM_PIVOTS=NUM_PIVOTS, num_warps=8,
        )  # fmt: skip
    return out, cut


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    min_p: torch.Tensor | None = None,
    uniform: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits [B, V] (any float dtype) -> token ids [B] int64. temperature [B] (0: greedy); top_k [B] int
    (<= 0 or >= V: off); top_p [B] (1: off); min_p [B] (0: off); uniform [B, V] noise in [0, 1)."""
    return sample_with_threshold(logits, temperature, top_k, top_p, min_p, uniform, generator)[0]
