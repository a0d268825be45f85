"""ALiBi slopes (Press et al., "Train Short, Test Long"): the one place the engine computes them.

Head h adds slope[h] * (key_pos - query_pos) to its attention scores, a penalty linear in the
distance (BLOOM, MPT, Falcon-alibi, Baichuan-13B). With n' = the largest power of two <= n heads:
    slopes of heads 0..n'-1:  2 ** (-max_bias * k / n')       for k = 1 .. n'
    the n - n' remaining:     2 ** (-max_bias * k / (2 n'))   for k = 1, 3, 5, ...
i.e. the power-of-two set is interleaved with the odd terms of the set for twice as many heads.
BLOOM's `build_alibi_tensor` and Baichuan's `_get_interleave` are this with max_bias 8; MPT's
`gen_slopes` is this with its `alibi_bias_max`. Falcon (alibi=True) rounds these slopes to bf16 before
use: its model file passes `alibi_slopes(n).bfloat16().float()` to match it. HF adds slope * key_pos instead of slope *
(key_pos - query_pos): the same softmax (a per-row constant), but ours stays small at long context.
"""

from __future__ import annotations

import torch


def alibi_slopes(num_heads: int, max_bias: float = 8.0) -> torch.Tensor:
    """[num_heads] fp32 slopes (on the default device), head order as the checkpoint's query heads."""
    if num_heads < 1:
        raise ValueError(f"alibi_slopes: num_heads must be positive, got {num_heads}")
    if max_bias <= 0:
        raise ValueError(f"alibi_slopes: max_bias must be positive, got {max_bias}")
    pow2 = 1 << (num_heads.bit_length() - 1)  # largest power of two <= num_heads
    # fp32 powers of an fp32 base, as transformers computes them: the slopes match it bit for bit
    base = torch.tensor(2.0 ** (-max_bias / pow2), dtype=torch.float32)
    slopes = base.pow(torch.arange(1, pow2 + 1, dtype=torch.int32))
    if num_heads > pow2:
        extra_base = torch.tensor(2.0 ** (-max_bias / (2 * pow2)), dtype=torch.float32)
        odd = torch.arange(1, 2 * (num_heads - pow2), 2, dtype=torch.int32)
        slopes = torch.cat([slopes, extra_base.pow(odd)])
    return slopes
