"""PagedAttention's per-layer options: defaults, what reaches the backend, bad values refused by name."""

from __future__ import annotations

import pytest
import torch

from lmforge.kernels.alibi import alibi_slopes
from lmforge.runtime.engine.attention import get_attention_backend
from lmforge.runtime.models.layers import PagedAttention


def test_defaults_are_plain_llama_attention():
    attn = PagedAttention(4, 2, 16, get_attention_backend("torch"))
    assert attn.scale == 16**-0.5
    assert attn.sliding_window is None and attn.alibi_slopes is None and attn.logits_soft_cap is None


def test_options_reach_the_backend_and_slopes_follow_the_module():
    """The real torch backend through PagedAttention equals the kernel reference with the same options."""
    from lmforge.kernels import reference
    from lmforge.kernels.random_cache import random_paged_cache
    from lmforge.runtime.engine.attention import CommonAttentionMetadata

    backend = get_attention_backend("torch")
    opts = dict(sliding_window=5, logits_soft_cap=2.0)
    attn = PagedAttention(4, 2, 16, backend, scale=0.3, alibi_slopes=alibi_slopes(4).double(), **opts)
    assert attn.alibi_slopes.dtype == torch.float32  # the kernels read fp32 slopes
    assert (
        "alibi_slopes" in dict(attn.named_buffers()) and "alibi_slopes" not in attn.state_dict()
    )  # not a weight
    (attn.k_cache, attn.v_cache), _, bt, sl = random_paged_cache([9], 2, 16, 4, torch.float32, "cpu")
    slots = torch.tensor([int(bt[0, p // 4]) * 4 + p % 4 for p in range(9)])
    k, v = attn.k_cache.view(-1, 2, 16)[slots].clone(), attn.v_cache.view(-1, 2, 16)[slots].clone()
    q = 3 * torch.randn(9, 4, 16)
    meta = backend.build_metadata(CommonAttentionMetadata(slots, bt.long(), [9], [9], 4))
    out = attn(q, k, v, meta)
    cu = torch.tensor([0, 9], dtype=torch.int32)
    expected = reference.paged_prefill_attention(
        q, attn.k_cache, attn.v_cache, bt, sl, cu, 9, 0.3, alibi_slopes=alibi_slopes(4), **opts
    )
    assert torch.allclose(out, expected, atol=2e-6)
    plain = reference.paged_prefill_attention(q, attn.k_cache, attn.v_cache, bt, sl, cu, 9, 0.3)
    assert not torch.allclose(out, plain, atol=1e-2)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(scale=0.0), "scale must be positive"),
        (dict(sliding_window=0), "sliding_window must be a positive int or None, got 0"),
        (dict(sliding_window=4.5), "sliding_window must be a positive int or None, got 4.5"),
        (dict(logits_soft_cap=-1.0), "logits_soft_cap must be positive"),
        (dict(alibi_slopes=torch.ones(3)), r"alibi_slopes must have shape \(4,\), got \(3,\)"),
    ],
    ids=["scale", "window-zero", "window-float", "softcap", "slopes-shape"],
)
def test_bad_options_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PagedAttention(4, 2, 16, get_attention_backend("torch"), **kwargs)
