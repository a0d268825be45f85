"""Blocks wholly before every layer's sliding window are released: exact block ids, ref counts, prefix
hits and preemption (4-token blocks, window 6: a query at position i reads keys i-5..i)."""

from __future__ import annotations

import pytest

from lmforge.runtime.engine.block_manager import (
    RELEASED_BLOCK_ID,
    BlockManager,
    max_blocks_per_seq,
    reusable_window,
)
from lmforge.runtime.engine.sequence import Sequence
from lmforge.runtime.sampling_params import SamplingParams

BS, WINDOW = 4, 6


def make_seq(token_ids: list[int]) -> Sequence:
    return Sequence("r", 0, list(token_ids), len(token_ids), SamplingParams())


def admit(bm: BlockManager, seq: Sequence) -> int:
    blocks, num_cached = bm.get_computed_blocks(seq)
    assert bm.allocate_slots(seq, seq.num_tokens - num_cached, blocks)
    seq.num_computed_tokens = seq.num_tokens
    return num_cached


def decode(bm: BlockManager, seq: Sequence, steps: int) -> list[int]:
    """`steps` decode steps as the scheduler runs them; returns the blocks held after each."""
    held = []
    for _ in range(steps):
        seq.token_ids.append(1000 + seq.num_tokens)
        if not bm.allocate_slots(seq, 1):
            break
        seq.num_computed_tokens += 1
        held.append(bm.num_held_blocks(seq))
    return held


@pytest.mark.parametrize(
    "windows,expected",
    [
        ([4, 4], 4),
        ([4, 8, 2], 8),
        ([4, None], None),
        ([None, None], None),
        ([], None),
    ],
    ids=["all-same", "largest", "one-global", "all-global", "no-layers"],
)
def test_reusable_window_needs_every_layer_to_slide(windows, expected):
    assert reusable_window(windows) == expected


@pytest.mark.parametrize(
    "args,expected",
    [
        ((100, 4, None, 8), 25),  # no window: the whole context
        ((100, 4, 10, 1), 4),  # decode: ceil(10 / 4) + 1
        ((100, 4, 10, 8), 6),  # an 8-token chunk on top of the window
        ((8, 4, 10, 8), 2),  # a context shorter than the window
    ],
)
def test_max_blocks_per_seq(args, expected):
    assert max_blocks_per_seq(*args) == expected


def test_decode_past_the_window_holds_window_sized_kv():
    bm = BlockManager(num_blocks=6, block_size=BS, sliding_window=WINDOW)
    a = make_seq(list(range(5)))
    admit(bm, a)
    held = decode(bm, a, 30)
    assert len(held) == 30 and max(held) == max_blocks_per_seq(1000, BS, WINDOW, 1) == 3
    # 35 tokens: the next query (34) reads 29..34, i.e. blocks 7 and 8 of the table; 0..6 are released
    ids = bm.get_block_ids(a)
    assert len(ids) == 9 and ids[:7] == [RELEASED_BLOCK_ID] * 7
    assert bm.num_held_blocks(a) == 2 and bm.num_free_blocks == 4
    bm.free(a)  # preemption / finish after releases: everything comes back once
    assert bm.num_free_blocks == 6 and all(b.ref_cnt == 0 for b in bm.pool.blocks)


def test_with_a_global_layer_nothing_is_released():
    """The control: the same decode without a reusable window runs out of the 6 blocks at 24 tokens."""
    bm = BlockManager(num_blocks=6, block_size=BS, sliding_window=reusable_window([WINDOW, None]))
    a = make_seq(list(range(5)))
    admit(bm, a)
    held = decode(bm, a, 30)
    assert len(held) == 19 and held[-1] == 6 and RELEASED_BLOCK_ID not in bm.get_block_ids(a)[1:]


def test_shared_prefix_block_survives_while_in_another_window():
    """b hits a's prompt blocks; a decoding far past the window drops its references, but the blocks b
    still reads keep b's reference and are never handed to a third sequence."""
    bm = BlockManager(num_blocks=12, block_size=BS, sliding_window=WINDOW)
    prompt = list(range(16))
    a, b = make_seq(prompt), make_seq(prompt + [99])
    admit(bm, a)
    assert bm.get_block_ids(a) == [0, 1, 2, 3]
    assert admit(bm, b) == 16  # first new token at 16: keys 11.. -> blocks 0 and 1 are dead hits, not taken
    assert bm.get_block_ids(b) == [RELEASED_BLOCK_ID, RELEASED_BLOCK_ID, 2, 3, 4]
    assert [blk.ref_cnt for blk in bm.pool.blocks[:5]] == [1, 1, 2, 2, 1]
    decode(bm, a, 20)  # a: 36 tokens, holds blocks 7.. of its table only
    assert [blk.ref_cnt for blk in bm.pool.blocks[:5]] == [0, 0, 1, 1, 1]
    c = make_seq(list(range(500, 500 + 4 * BS)))
    blocks, _ = bm.get_computed_blocks(c)
    assert bm.allocate_slots(c, c.num_tokens, blocks)
    assert not {2, 3, 4} & set(bm.get_block_ids(c))


def test_released_blocks_keep_their_hash_for_later_hits():
    """A window-released prompt block still holds its K/V while free: a later request with the same
    prompt reuses it (dead hits are skipped, live ones taken back from the free queue)."""
    bm = BlockManager(num_blocks=8, block_size=BS, sliding_window=WINDOW)
    prompt = list(range(12))
    a = make_seq(prompt)
    admit(bm, a)
    decode(bm, a, 12)  # 24 tokens: the last query (23) reads 18..23, table entries 0..3 are released
    assert bm.get_block_ids(a)[:4] == [RELEASED_BLOCK_ID] * 4 and bm.num_held_blocks(a) == 2
    b = make_seq(prompt + [7, 7, 7])  # 15 tokens: 3 full blocks cacheable, first new token 12
    free_before = bm.pool.get_all_free_blocks()
    assert admit(bm, b) == 12
    assert bm.get_block_ids(b)[:3] == [RELEASED_BLOCK_ID, 1, 2]  # keys 7.. : block 0 is a dead hit
    assert 0 in bm.pool.get_all_free_blocks() and 0 in free_before  # the dead hit stays free
    assert bm.pool.blocks[1].ref_cnt == 1 and bm.pool.blocks[2].ref_cnt == 1


def test_preempted_sequence_recomputes_in_window_sized_chunks():
    """After preemption a 25-token sequence (7 blocks of context) is recomputed in 8-token chunks inside
    the 6-block pool: each chunk needs the window behind it plus itself, never the whole context."""
    bm = BlockManager(num_blocks=6, block_size=BS, sliding_window=WINDOW)
    a = make_seq(list(range(5)))
    admit(bm, a)
    decode(bm, a, 20)
    bm.free(a)  # the scheduler's _preempt
    a.num_computed_tokens = 0
    blocks, num_cached = bm.get_computed_blocks(a)
    assert num_cached == 0  # block 0 was handed out again (the pool is smaller than the context): no chain
    held = []
    while a.num_computed_tokens < a.num_tokens:
        chunk = min(8, a.num_tokens - a.num_computed_tokens)
        assert bm.allocate_slots(a, chunk, blocks)
        blocks = []
        a.num_computed_tokens += chunk
        held.append(bm.num_held_blocks(a))
    assert held == [2, 4, 4, 3] and max(held) <= max_blocks_per_seq(1000, BS, WINDOW, 8)
