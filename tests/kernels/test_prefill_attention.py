import pytest
import torch

from lmforge.kernels import reference
from lmforge.kernels.prefill_attention import paged_prefill_attention
from lmforge.kernels.random_cache import random_paged_cache

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1.5e-2, rtol=1.5e-2)}  # fmt: skip


def make_batch(chunks, num_q_heads, num_kv_heads, head_dim, block_size, dtype, device, int8=False):
    """chunks: [(num_cached_prefix, q_len)]. Returns q, caches, scales, block_tables, seq_lens, cu_seqlens_q."""
    seq_lens = [prefix + q_len for prefix, q_len in chunks]
    caches, scales, block_tables, sl = random_paged_cache(
        seq_lens, num_kv_heads, head_dim, block_size, dtype, device, int8=int8, spare_blocks=2
    )
    q_lens = [q_len for _, q_len in chunks]
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    q = torch.randn(int(cu[-1]), num_q_heads, head_dim, dtype=dtype, device=device)
    return q, caches, scales, block_tables, sl, cu.to(device), max(q_lens)


def run_both(q, caches, scales, bt, sl, cu, max_q_len, scale=None, **kwargs):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kw = dict(k_scale_cache=scales[0], v_scale_cache=scales[1], **kwargs)
    out = paged_prefill_attention(q, *caches, bt, sl, cu, max_q_len, scale, **kw)
    ref = reference.paged_prefill_attention(q, *caches, bt, sl, cu, max_q_len, scale, **kw)
    return out, ref


# (cached prefix, chunk length): a fresh prompt, a prefix-cache hit ending mid-block, a decode-like
# single token, a chunk crossing several 16-token blocks and BLOCK_M tiles.
CHUNKS = [(0, 5), (16, 3), (7, 1), (30, 18)]
# Each dtype once and each GQA ratio (1, 4, 8) once: the interpreter runs ~20 programs a second.
CASES = [(torch.float32, 2, 2), (torch.float16, 4, 1), (torch.bfloat16, 8, 1), (torch.bfloat16, 2, 2)]


@pytest.mark.parametrize(
    "dtype,num_q_heads,num_kv_heads", CASES, ids=["fp32-gqa1", "fp16-gqa4", "bf16-gqa8", "bf16-gqa1"]
)
def test_prefill_matches_reference(device, dtype, num_q_heads, num_kv_heads):
    batch = make_batch(CHUNKS, num_q_heads, num_kv_heads, 16, 16, dtype, device)
    out, ref = run_both(*batch)
    torch.testing.assert_close(out, ref, **TOL[dtype])


def test_prefill_fresh_prompt_equals_causal_sdpa(device):
    """No cached prefix: plain causal attention over the chunk itself (GQA expanded)."""
    q, caches, scales, bt, sl, cu, max_q = make_batch([(0, 19)], 4, 2, 16, 8, torch.float32, device)
    out, _ = run_both(q, caches, scales, bt, sl, cu, max_q)
    k = reference.gather_kv(caches[0], bt[0], 19).repeat_interleave(2, dim=1)
    v = reference.gather_kv(caches[1], bt[0], 19).repeat_interleave(2, dim=1)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True
    ).transpose(0, 1)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("block_size", [8, 16])
def test_prefill_int8_kv(device, block_size):
    batch = make_batch([(3, 9), (20, 4)], 2, 1, 16, block_size, torch.bfloat16, device, int8=True)
    out, ref = run_both(*batch)
    torch.testing.assert_close(out, ref, **TOL[torch.bfloat16])


def test_prefill_sliding_window_and_odd_head_dim(device):
    batch = make_batch([(9, 14), (0, 3)], 1, 1, 24, 16, torch.float32, device)
    out, ref = run_both(*batch, sliding_window=6)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


def test_prefill_window_chunks_never_read_blocks_before_the_window(device):
    """Chunked prefill past the window: blocks before every query's window may belong to someone else."""
    q, caches, scales, bt, sl, cu, max_q = make_batch([(24, 9)], 2, 1, 16, 8, torch.float32, device)
    out, ref = run_both(q, caches, scales, bt, sl, cu, max_q, sliding_window=7)
    for cache in caches:
        cache[bt[0, :2].long()] = float("nan")  # positions 0..15; the first query (24) sees 18..24
    poisoned, _ = run_both(q, caches, scales, bt, sl, cu, max_q, sliding_window=7)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    assert torch.equal(poisoned, out)


@pytest.mark.parametrize(
    "dtype,int8",
    [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)],
    ids=["fp32", "bf16", "int8"],
)
def test_prefill_score_options(device, dtype, int8):
    """ALiBi (6 heads), soft cap, custom scale and a window together, over a fresh prompt, a prefix hit and a
    chunk crossing tiles; each option alone in fp32 too."""
    chunks = [(0, 5), (16, 3), (20, 18)]
    batch = make_batch(chunks, 6, 2, 16, 8, dtype, device, int8=int8)
    q, caches, scales, bt, sl, cu, max_q = batch
    q.mul_(3)  # large scores: the cap and the bias matter
    slopes = reference.alibi_slopes(6).to(device)
    every = dict(alibi_slopes=slopes, logits_soft_cap=2.0, sliding_window=9, scale=1 / 12)
    singles = (
        [dict(alibi_slopes=slopes), dict(logits_soft_cap=1.5), dict(scale=0.05)]
        if dtype == torch.float32
        else []
    )
    plain = reference.paged_prefill_attention(
        q, *caches, bt, sl, cu, max_q, 0.25, k_scale_cache=scales[0], v_scale_cache=scales[1]
    )
    for opts in [every, *singles]:
        out, ref = run_both(*batch, **opts)
        torch.testing.assert_close(out, ref, **TOL[dtype])
        assert not torch.allclose(out.float(), plain.float(), atol=0.05), opts


def test_prefill_max_q_len_larger_than_needed(device):
    """A generous max_q_len (e.g. the scheduler's budget) only adds idle programs."""
    q, caches, scales, bt, sl, cu, _ = make_batch([(4, 3), (0, 2)], 2, 2, 16, 16, torch.float32, device)
    out, ref = run_both(q, caches, scales, bt, sl, cu, 40)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


@pytest.mark.gpu
@pytest.mark.parametrize("int8", [False, True], ids=["bf16", "int8"])
def test_prefill_llama8b_shapes_gpu(int8):
    chunks = [(0, 512), (1000, 256), (37, 1), (4096, 300)]
    batch = make_batch(chunks, 32, 8, 128, 16, torch.bfloat16, "cuda", int8=int8)
    out, ref = run_both(*batch)
    torch.testing.assert_close(out, ref, **TOL[torch.bfloat16])
