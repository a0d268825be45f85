import pytest
import torch

from lmforge.kernels import reference
from lmforge.kernels.decode_attention import paged_decode_attention
from lmforge.kernels.random_cache import random_paged_cache

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1.5e-2, rtol=1.5e-2)}  # fmt: skip


def make_paged_cache(seq_lens, num_kv_heads, head_dim, block_size, dtype, device, int8=False):
    """Random K/V for each sequence in randomly scattered blocks; block tables padded with block 0."""
    return random_paged_cache(
        seq_lens, num_kv_heads, head_dim, block_size, dtype, device, int8=int8, spare_blocks=3, pad_columns=1
    )


def run_both(q, caches, scales, block_tables, seq_lens, scale=None, **kwargs):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kw = dict(k_scale_cache=scales[0], v_scale_cache=scales[1], **kwargs)
    out = paged_decode_attention(q, *caches, block_tables, seq_lens, scale, **kw)
    ref = reference.paged_decode_attention(q, *caches, block_tables, seq_lens, scale, **kw)
    return out, ref


# Each dtype once and each GQA ratio (1, 4, 8) once: the interpreter runs ~20 programs a second.
CASES = [(torch.float32, 2, 2), (torch.float16, 8, 2), (torch.bfloat16, 8, 1), (torch.bfloat16, 4, 4)]


@pytest.mark.parametrize(
    "dtype,num_q_heads,num_kv_heads", CASES, ids=["fp32-gqa1", "fp16-gqa4", "bf16-gqa8", "bf16-gqa1"]
)
def test_decode_matches_reference(device, dtype, num_q_heads, num_kv_heads):
    seq_lens = [1, 15, 16, 17, 40]  # block boundaries of block_size 16
    caches, scales, bt, sl = make_paged_cache(seq_lens, num_kv_heads, 32, 16, dtype, device)
    q = torch.randn(len(seq_lens), num_q_heads, 32, dtype=dtype, device=device)
    out, ref = run_both(q, caches, scales, bt, sl)
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("num_splits", [1, 3, None], ids=["one-split", "three-splits", "auto"])
@pytest.mark.parametrize("block_size", [8, 16])
def test_decode_split_k(device, num_splits, block_size):
    """Long contexts split across programs and merged by log-sum-exp; a padding row (seq_len 0) gives zeros."""
    seq_lens = [70, 0, 33]
    caches, scales, bt, sl = make_paged_cache(seq_lens, 2, 16, block_size, torch.float32, device)
    q = torch.randn(3, 8, 16, device=device)
    out, ref = run_both(q, caches, scales, bt, sl, num_splits=num_splits)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_decode_odd_head_dim_and_strided_q(device):
    """head_dim 24 (padded to 32 inside) and q as a view into a fused qkv buffer."""
    seq_lens = [5, 23]
    caches, scales, bt, sl = make_paged_cache(seq_lens, 1, 24, 16, torch.float16, device)
    qkv = torch.randn(2, (4 + 2) * 24, dtype=torch.float16, device=device)
    q = qkv[:, : 4 * 24].view(2, 4, 24)
    out, ref = run_both(q, caches, scales, bt, sl)
    torch.testing.assert_close(out, ref, **TOL[torch.float16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(2, 2), (8, 1)], ids=["gqa1", "gqa8"])
def test_decode_int8_kv(device, dtype, num_q_heads, num_kv_heads):
    seq_lens = [9, 48]
    caches, scales, bt, sl = make_paged_cache(seq_lens, num_kv_heads, 16, 16, dtype, device, int8=True)
    q = torch.randn(2, num_q_heads, 16, dtype=dtype, device=device)
    out, ref = run_both(q, caches, scales, bt, sl, num_splits=2)
    torch.testing.assert_close(out, ref, **TOL[dtype])


def test_decode_sliding_window(device):
    seq_lens = [6, 37]
    caches, scales, bt, sl = make_paged_cache(seq_lens, 2, 16, 8, torch.float32, device)
    q = torch.randn(2, 4, 16, device=device)
    out, ref = run_both(q, caches, scales, bt, sl, sliding_window=10, num_splits=2)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    full = reference.paged_decode_attention(q, *caches, bt, sl, 0.25)
    assert torch.allclose(out[0], full[0], atol=1e-5) and not torch.allclose(out[1], full[1], atol=1e-3)


def test_decode_window_never_reads_blocks_before_it(device):
    """Blocks wholly before the window may already hold another sequence's K/V (the block manager frees
    them): filling them with NaN must not change the output."""
    seq_lens = [45]
    caches, scales, bt, sl = make_paged_cache(seq_lens, 2, 16, 8, torch.float32, device)
    q = torch.randn(1, 4, 16, device=device)
    out, ref = run_both(q, caches, scales, bt, sl, sliding_window=20, num_splits=2)
    for cache in caches:
        cache[bt[0, :3].long()] = float("nan")  # positions 0..23; the window is 25..44
    poisoned, _ = run_both(q, caches, scales, bt, sl, sliding_window=20, num_splits=2)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    assert torch.equal(poisoned, out)


# (dtype, option set): each option alone in fp32, all of them together in bf16 and with an int8 cache.
OPTIONS = {
    "alibi": dict(alibi=True),
    "softcap": dict(logits_soft_cap=1.5),
    "scale": dict(scale=0.05),
    "all": dict(alibi=True, logits_soft_cap=2.0, sliding_window=11, scale=1 / 12),
}


@pytest.mark.parametrize(
    "dtype,option,int8",
    [
        (torch.float32, "alibi", False),
        (torch.float32, "softcap", False),
        (torch.float32, "scale", False),
        (torch.bfloat16, "all", False),
        (torch.float32, "all", True),
    ],
    ids=["fp32-alibi", "fp32-softcap", "fp32-scale", "bf16-all", "int8-all"],
)
def test_decode_score_options(device, dtype, option, int8):
    """ALiBi slopes (6 heads: not a power of two), logit soft-capping, a custom scale, and all with a window."""
    opts = dict(OPTIONS[option])
    if opts.pop("alibi", False):
        opts["alibi_slopes"] = reference.alibi_slopes(6).to(device)
    seq_lens = [1, 19, 40]
    caches, scales, bt, sl = make_paged_cache(seq_lens, 2, 16, 8, dtype, device, int8=int8)
    q = 3 * torch.randn(3, 6, 16, dtype=dtype, device=device)  # large scores: the cap and the bias matter
    out, ref = run_both(q, caches, scales, bt, sl, num_splits=2, **opts)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    plain = reference.paged_decode_attention(
        q, *caches, bt, sl, 0.25, k_scale_cache=scales[0], v_scale_cache=scales[1]
    )
    assert not torch.allclose(out[2].float(), plain[2].float(), atol=0.05)  # the option changed the answer


@pytest.mark.gpu
@pytest.mark.parametrize("int8", [False, True], ids=["bf16", "int8"])
@pytest.mark.parametrize("batch,max_len", [(1, 4000), (16, 1500), (64, 300)])
def test_decode_llama8b_shapes_gpu(batch, max_len, int8):
    seq_lens = torch.randint(1, max_len, (batch,)).tolist()
    caches, scales, bt, sl = make_paged_cache(seq_lens, 8, 128, 16, torch.bfloat16, "cuda", int8=int8)
    q = torch.randn(batch, 32, 128, dtype=torch.bfloat16, device="cuda")
    out, ref = run_both(q, caches, scales, bt, sl)
    torch.testing.assert_close(out, ref, **TOL[torch.bfloat16])
