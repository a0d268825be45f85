"""Torch paged attention vs plain causal attention over each sequence's full K/V."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.runtime.engine.attention import CommonAttentionMetadata, get_attention_backend

H, HKV, D, BS = 4, 2, 8, 4

def assert_close(actual, expected, atol=1e-5, rtol=0.0):
    """torch.testing.assert_close costs seconds of imports on first use; this is enough here."""
    assert actual.shape == expected.shape
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol), (actual - expected).abs().max()



def reference(q, k, v):  # q [L, H, D], k/v [L, Hkv, D]; causal; returns the last q.shape[0] rows
    k = k.repeat_interleave(H // HKV, dim=1)
    v = v.repeat_interleave(H // HKV, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * D**-0.5
    qlen, klen = q.shape[0], k.shape[0]
    mask = torch.arange(klen)[None, :] <= torch.arange(klen - qlen, klen)[:, None]
    return torch.einsum("hqk,khd->qhd", scores.masked_fill(~mask, -torch.inf).softmax(-1), v)


def test_mixed_batch_matches_reference():
    g = torch.Generator().manual_seed(0)
    num_blocks = 32
    k_cache = torch.zeros(num_blocks, BS, HKV, D)
    v_cache = torch.zeros(num_blocks, BS, HKV, D)
    # (cached tokens, new tokens): fresh prefill, chunk after a cached prefix, decodes
    shapes = [(0, 7), (9, 5), (13, 1), (3, 1), (0, 1)]
    free = list(torch.randperm(num_blocks, generator=g).tolist())
    tables, full_k, full_v, q_new, k_new, v_new, slots = [], [], [], [], [], [], []
    for cached, new in shapes:
        total = cached + new
        table = [free.pop() for _ in range(-(-total // BS))]
        k = torch.randn(total, HKV, D, generator=g)
        v = torch.randn(total, HKV, D, generator=g)
        for p in range(cached):  # what earlier steps wrote
            k_cache[table[p // BS], p % BS] = k[p]
            v_cache[table[p // BS], p % BS] = v[p]
        tables.append(table)
        full_k.append(k)
        full_v.append(v)
        q_new.append(torch.randn(new, H, D, generator=g))
        k_new.append(k[cached:])
        v_new.append(v[cached:])
        slots += [table[p // BS] * BS + p % BS for p in range(cached, total)]
    width = max(map(len, tables))
    common = CommonAttentionMetadata(
        slot_mapping=torch.tensor(slots),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        query_lens=[n for _, n in shapes], seq_lens=[c + n for c, n in shapes], block_size=BS)
    backend = get_attention_backend("torch")
    out = backend.forward(torch.cat(q_new), torch.cat(k_new), torch.cat(v_new), k_cache, v_cache,
                          backend.build_metadata(common), D**-0.5)
    expected = torch.cat([reference(q, k, v) for q, k, v in zip(q_new, full_k, full_v, strict=True)])
    assert_close(out, expected, atol=1e-5)
    # and every new K/V landed in its slot
    assert_close(k_cache.view(-1, HKV, D)[torch.tensor(slots)], torch.cat(k_new))


def test_unknown_backend_is_a_clear_error():
    import pytest

    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        get_attention_backend("flash")


def test_sdpa_gqa_matches_repeat():  # the backend relies on enable_gqa
    q, k = torch.randn(1, H, 3, D), torch.randn(1, HKV, 3, D)
    a = F.scaled_dot_product_attention(q, k, k, enable_gqa=True)
    b = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), k.repeat_interleave(2, 1))
    assert_close(a, b)
