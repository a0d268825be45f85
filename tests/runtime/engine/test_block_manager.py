"""Block pool, block tables and the prefix cache: exact block ids, ref counts, eviction order.

16-token blocks, 11 blocks, like vLLM's tests/v1/core/test_prefix_caching.py.
"""

from __future__ import annotations

import pytest

from lmforge.runtime.engine.block_manager import BlockManager, BlockPool, hash_block_tokens
from lmforge.runtime.engine.sequence import Sequence
from lmforge.runtime.sampling_params import SamplingParams

BS = 16


def make_seq(token_ids: list[int]) -> Sequence:
    return Sequence("r", 0, list(token_ids), len(token_ids), SamplingParams())


def admit(bm: BlockManager, seq: Sequence, num_new: int | None = None) -> int:
    """What the scheduler does for a waiting sequence; returns the cached token count."""
    blocks, num_cached = bm.get_computed_blocks(seq)
    assert bm.allocate_slots(seq, seq.num_tokens - num_cached if num_new is None else num_new, blocks)
    seq.num_computed_tokens = num_cached
    return num_cached


def refs(bm: BlockManager) -> list[int]:
    return [b.ref_cnt for b in bm.pool.blocks]


def test_pool_hands_out_blocks_in_order_and_counts_free():
    pool = BlockPool(4)
    assert [b.block_id for b in pool.get_new_blocks(3)] == [0, 1, 2]
    assert pool.num_free_blocks == 1
    with pytest.raises(ValueError):
        pool.get_new_blocks(2)


def test_chained_hash_depends_on_parent():
    a = hash_block_tokens(None, range(16))
    assert a == hash_block_tokens(None, list(range(16)))
    assert hash_block_tokens(a, range(16)) != hash_block_tokens(hash_block_tokens(None, [1] * 16), range(16))


def test_prefix_hit_shares_blocks_and_eviction_order():
    bm = BlockManager(num_blocks=11, block_size=BS)
    common = list(range(48))  # three full blocks
    a = make_seq(common + [100 + i for i in range(7)])  # 55 tokens
    assert admit(bm, a) == 0
    assert bm.get_block_ids(a) == [0, 1, 2, 3]
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (55, 0)

    b = make_seq(common + [200 + i for i in range(7)])
    assert admit(bm, b) == 48
    assert bm.get_block_ids(b) == [0, 1, 2, 4]
    assert refs(bm)[:5] == [2, 2, 2, 1, 1]
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (110, 48)
    assert bm.num_free_blocks == 6

    bm.free(a)
    assert refs(bm)[:5] == [1, 1, 1, 0, 1]
    # block 3 held no full block, so nothing is lost by reusing it first
    assert bm.pool.get_all_free_blocks() == [3, 5, 6, 7, 8, 9, 10]
    bm.free(b)
    # tail first: the uncached partial block 4 to the front, then the prefix 2, 1, 0 at the back
    assert bm.pool.get_all_free_blocks() == [4, 3, 5, 6, 7, 8, 9, 10, 2, 1, 0]
    assert bm.num_free_blocks == 11 and bm.usage == 0.0

    # 10 new blocks: every free block but the LRU-last cached ones, evicting block 2's prefix
    c = make_seq([999] * (10 * BS))
    admit(bm, c)
    assert bm.get_block_ids(c) == [4, 3, 5, 6, 7, 8, 9, 10, 2, 1]
    bm.free(c)
    d = make_seq(common + [7])
    assert admit(bm, d) == BS  # block 0 survived (freed last), blocks 1 and 2 were evicted
    assert bm.get_block_ids(d) == [0, 1, 2, 10]  # c was freed tail first: 1, 2, 10, 9, ...
    assert bm.pool.get_all_free_blocks() == [9, 8, 7, 6, 5, 3, 4]
    bm.free(d)


def test_cache_hit_never_covers_the_last_token():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_seq(list(range(32)))
    admit(bm, a)
    b = make_seq(list(range(32)))  # same 2 full blocks; the last token must still be computed
    assert admit(bm, b) == 16
    assert bm.get_block_ids(b) == [0, 2]
    assert refs(bm)[:3] == [2, 1, 1]


def test_decode_tokens_fill_and_register_blocks():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_seq(list(range(20)))
    admit(bm, a)
    a.num_computed_tokens = 20
    assert bm.get_block_ids(a) == [0, 1] and len(bm.pool.cached) == 1
    for t in range(20, 33):  # decode: one new token per step
        a.token_ids.append(t)
        assert bm.allocate_slots(a, 1)
        a.num_computed_tokens += 1
    assert bm.get_block_ids(a) == [0, 1, 2] and len(bm.pool.cached) == 2
    b = make_seq(list(range(33)) + [5])
    assert admit(bm, b) == 32
    assert bm.get_block_ids(b) == [0, 1, 3]


def test_cached_free_block_reused_by_hit_leaves_free_queue():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_seq(list(range(17)))
    admit(bm, a)
    bm.free(a)
    assert bm.pool.get_all_free_blocks() == [1, 2, 3, 0]
    b = make_seq(list(range(17)))
    assert admit(bm, b) == 16
    assert bm.get_block_ids(b) == [0, 1]
    assert bm.pool.get_all_free_blocks() == [2, 3]


def test_allocation_failure_changes_nothing():
    bm = BlockManager(num_blocks=3, block_size=BS)
    a = make_seq(list(range(40)))
    admit(bm, a)
    assert bm.num_free_blocks == 0
    b = make_seq(list(range(1000, 1010)))
    blocks, _ = bm.get_computed_blocks(b)
    assert not bm.allocate_slots(b, 10, blocks)
    assert bm.get_block_ids(b) == [] and bm.num_free_blocks == 0
    # a cache hit sitting in the free queue also needs a free slot to be taken back
    bm.free(a)
    c = make_seq(list(range(1000, 1000 + 3 * BS)))
    admit(bm, c)
    d = make_seq(list(range(40)))
    blocks, num_cached = bm.get_computed_blocks(d)
    assert num_cached == 0  # a's blocks were all evicted by c


def test_prefix_caching_disabled():
    bm = BlockManager(num_blocks=6, block_size=BS, enable_prefix_caching=False)
    a, b = make_seq(list(range(40))), make_seq(list(range(40)))
    assert admit(bm, a) == 0 and admit(bm, b) == 0
    assert bm.get_block_ids(a) == [0, 1, 2] and bm.get_block_ids(b) == [3, 4, 5]
    assert not bm.pool.cached and bm.prefix_cache_queries == 0


def test_free_returns_every_block_and_reset():
    bm = BlockManager(num_blocks=10, block_size=BS)
    seqs = [make_seq(list(range(i, i + 30))) for i in range(4)]
    for s in seqs:
        admit(bm, s)
    assert bm.num_free_blocks == 2 and bm.usage == pytest.approx(0.8)
    assert not bm.reset_prefix_cache()
    for s in seqs:
        bm.free(s)
    assert bm.num_free_blocks == 10 and all(r == 0 for r in refs(bm))
    assert bm.reset_prefix_cache() and not bm.pool.cached
