"""Torch paged attention vs plain causal attention over each sequence's full K/V."""

from __future__ import annotations

import torch

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
        query_lens=[n for _, n in shapes],
        seq_lens=[c + n for c, n in shapes],
        block_size=BS,
    )
    backend = get_attention_backend("torch")
    out = backend.forward(
        torch.cat(q_new),
        torch.cat(k_new),
        torch.cat(v_new),
        k_cache,
        v_cache,
        backend.build_metadata(common),
        D**-0.5,
    )
    expected = torch.cat([reference(q, k, v) for q, k, v in zip(q_new, full_k, full_v, strict=True)])
    assert_close(out, expected, atol=1e-5)
    # and every new K/V landed in its slot
    assert_close(k_cache.view(-1, HKV, D)[torch.tensor(slots)], torch.cat(k_new))


def test_unknown_backend_is_a_clear_error():
    import pytest

    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        get_attention_backend("flash")


def test_score_options_match_the_kernel_reference():
    """Window, ALiBi, soft cap and scale in the torch backend's three paths (fresh prompt, chunk after a
    cached prefix, batched decode) against `reference.paged_prefill_attention` on the same cache."""
    import pytest

    from lmforge.kernels import reference as ref
    from lmforge.kernels.random_cache import random_paged_cache

    g = torch.Generator().manual_seed(1)
    chunks = [(0, 7), (9, 5), (13, 1), (3, 1), (0, 1)]  # (cached, new)
    seq_lens = [c + n for c, n in chunks]
    torch.manual_seed(1)
    caches, _, bt, sl = random_paged_cache(seq_lens, HKV, D, BS, torch.float32, "cpu", spare_blocks=2)
    slots = torch.tensor(
        [int(bt[b, p // BS]) * BS + p % BS for b, (c, n) in enumerate(chunks) for p in range(c, c + n)]
    )
    k_new = caches[0].view(-1, HKV, D)[slots].clone()  # the step "writes" what the cache already holds
    v_new = caches[1].view(-1, HKV, D)[slots].clone()
    q = 3 * torch.randn(len(slots), H, D, generator=g)
    common = CommonAttentionMetadata(slots, bt.long(), [n for _, n in chunks], seq_lens, BS)
    cu = torch.tensor([0] + [n for _, n in chunks]).cumsum(0).to(torch.int32)
    backend = get_attention_backend("torch")
    slopes = ref.alibi_slopes(H)
    outputs = []
    for opts in [
        {},
        dict(sliding_window=3),
        dict(alibi_slopes=slopes),
        dict(logits_soft_cap=0.5),
        dict(sliding_window=5, alibi_slopes=slopes, logits_soft_cap=2.0),
    ]:
        out = backend.forward(
            q, k_new, v_new, caches[0], caches[1], backend.build_metadata(common), 0.3, **opts
        )
        expected = ref.paged_prefill_attention(q, *caches, bt, sl, cu, 7, 0.3, **opts)
        assert_close(out, expected, atol=2e-6)
        outputs.append(out)
    for other in outputs[1:]:  # every option changes the answer
        assert not torch.allclose(other, outputs[0], atol=1e-3)
    with pytest.raises(AssertionError):  # and the check has teeth: a wrong window is caught
        assert_close(
            outputs[1], ref.paged_prefill_attention(q, *caches, bt, sl, cu, 7, 0.3, sliding_window=4)
        )
