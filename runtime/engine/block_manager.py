"""Paged KV bookkeeping: the block pool, per-sequence block tables and the prefix cache. No torch.

Invariants
- A block is either referenced (ref_cnt > 0, owned by >= 1 running sequence) or in the free queue.
- The free queue is in eviction order (least recently freed first). A freed block that holds a
  cached prefix keeps its hash and content until it is handed out again; one without a hash goes
  to the front, since nothing is lost by reusing it first.
- A full block is registered under the chained hash H = sha256(H_parent, token ids) as soon as
  its tokens are scheduled: the runner writes a step's K/V before any attention reads them, so a
  later request in the same step may already reuse it.
- Cache hits never cover a sequence's last token: at least one token is computed to get logits.
  Nor do they cover a position whose logits still give a prompt logprob (vLLM: a prompt_logprobs
  request reads no cached prefix; its full blocks are still registered for others).
- Sliding windows (`sliding_window`: set only when EVERY layer slides; the largest window): a query at
  position i reads keys i - window < j <= i, and queries only move forward, so once a sequence's next
  token to compute is at position c, its blocks wholly before c - window + 1 are dead for good. They are
  released at the next allocation (their table entries stay, as RELEASED_BLOCK_ID, so positions still
  index the table; no kernel reads them) and a long context holds about window / block_size + 1 blocks.
  A released block is an ordinary free block: ref counts keep it while another sequence sharing it
  still sees it, and while free it keeps its hash, so a later prefix hit on it reads intact K/V (a
  block is only rewritten after `get_new_blocks` hands it out, which drops its hash first).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from lmforge.runtime.engine.sequence import Sequence

RELEASED_BLOCK_ID = 0  # the block table entry of a released (dead) position: any valid id, never attended to


def reusable_window(layer_windows: Seq[int | None]) -> int | None:
    """The window the block manager may free blocks behind: the largest layer window when every layer
    slides. None when any layer attends to the full context (Gemma2/3's global layers, Qwen2's lower
    layers): then every token stays visible to that layer and no block can ever be freed early."""
    windows = [w for w in layer_windows if w is not None]
    if not layer_windows or len(windows) < len(layer_windows):
        return None
    return max(windows)


def max_blocks_per_seq(
    max_model_len: int, block_size: int, sliding_window: int | None, max_chunk: int
) -> int:
    """The most blocks one sequence holds at once: its whole context, or with a reusable window the
    window behind its first new token plus the chunk (at most max_chunk tokens) computed in one step."""
    full = -(-max_model_len // block_size)
    if sliding_window is None:
        return full
    return min(full, -(-(sliding_window - 1 + max_chunk) // block_size) + 1)


@dataclass(eq=False, slots=True)
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None


def adapter_root_hash(lora_id: int) -> bytes | None:
    """The parent hash of a sequence's first block: None for the base model, else one per LoRA adapter
    id, so rows of different adapters (whose K/V differ for the same tokens) never share blocks."""
    if not lora_id:
        return None
    return hashlib.sha256(b"lora" + array("q", [lora_id]).tobytes()).digest()


def hash_block_tokens(parent_hash: bytes | None, token_ids: Seq[int], salt: Seq[int] = ()) -> bytes:
    """salt: what else the block's K/V depend on (length-dependent RoPE: `BlockManager.block_salt`)."""
    h = hashlib.sha256(parent_hash or b"root")
    h.update(array("q", token_ids).tobytes())
    if salt:
        h.update(b"salt" + array("q", salt).tobytes())
    return h.digest()


class BlockPool:
    """Owns every block, the LRU free queue and the hash -> block map of the prefix cache."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, KVCacheBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.cached: dict[bytes, KVCacheBlock] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def get_all_free_blocks(self) -> list[int]:
        """Free block ids in eviction order (for tests)."""
        return list(self.free_queue)

    def get_new_blocks(self, n: int) -> list[KVCacheBlock]:
        if n > len(self.free_queue):
            raise ValueError(f"asked for {n} blocks, {len(self.free_queue)} free")
        blocks = []
        for _ in range(n):
            _, block = self.free_queue.popitem(last=False)
            if block.block_hash is not None:  # evict the cached prefix it held
                if self.cached.get(block.block_hash) is block:
                    del self.cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            blocks.append(block)
        return blocks

    def touch(self, blocks: Seq[KVCacheBlock]) -> None:
        """Takes a reference on cached blocks found by a prefix lookup."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self.free_queue[block.block_id]
            block.ref_cnt += 1

    def free_blocks(self, blocks: Seq[KVCacheBlock]) -> None:
        """Drops one reference each; `blocks` in the order they should be evicted."""
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue[block.block_id] = block
                if block.block_hash is None:
                    self.free_queue.move_to_end(block.block_id, last=False)

    def get_cached_block(self, block_hash: bytes) -> KVCacheBlock | None:
        return self.cached.get(block_hash)

    def cache_block(self, block: KVCacheBlock, block_hash: bytes) -> None:
        if block.block_hash is None and block_hash not in self.cached:
            block.block_hash = block_hash
            self.cached[block_hash] = block

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            block.block_hash = None
        self.cached.clear()


class BlockManager:
    """Block tables per sequence on top of a BlockPool; what the scheduler talks to."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        sliding_window: int | None = None,
        block_salt: Callable[[int, int, int], Seq[int]] | None = None,
    ):
        """sliding_window: `reusable_window` of the model's layers (None: never free blocks early).
        block_salt(start, end, num_prompt_tokens): extra key of the block holding positions [start, end)
        when K/V depend on more than the tokens (longrope / dynamic RoPE rotate by the sequence length
        HF saw, `layers.rope_block_salt`); None: blocks are keyed by their tokens alone."""
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be positive or None, got {sliding_window}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.sliding_window = sliding_window
        self.block_salt = block_salt
        self.pool = BlockPool(num_blocks)
        # seq_id -> block table; None marks a released position (before every layer's window)
        self.seq_blocks: dict[int, list[KVCacheBlock | None]] = {}
        # seq_id -> the same table as block ids, kept in step with seq_blocks (no list built per step)
        self.seq_block_ids: dict[int, list[int]] = {}
        self.num_cached_blocks: dict[int, int] = {}  # seq_id -> leading blocks registered in the cache
        self.num_released_blocks: dict[int, int] = {}  # seq_id -> leading table entries released (windows)
        self.prefix_cache_queries = 0  # tokens looked up
        self.prefix_cache_hits = 0  # tokens found

    @property
    def num_total_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free_blocks / self.pool.num_blocks

    def get_block_ids(self, seq: Sequence) -> list[int]:
        """The sequence's live block table as ids (RELEASED_BLOCK_ID at released positions). The list
        is the block manager's own, updated in place (it only grows at the end, and released entries
        turn into RELEASED_BLOCK_ID): read it, never mutate it."""
        return self.seq_block_ids.get(seq.seq_id, [])

    def num_held_blocks(self, seq: Sequence) -> int:
        """Blocks the sequence references now (released positions excluded)."""
        return sum(b is not None for b in self.seq_blocks.get(seq.seq_id, ()))

    def _num_dead_blocks(self, first_new_token: int) -> int:
        """Leading blocks no layer reads again once tokens from `first_new_token` on are computed."""
        if self.sliding_window is None:
            return 0
        return max(0, first_new_token - self.sliding_window + 1) // self.block_size

    def _block_hashes(self, seq: Sequence, num_full_blocks: int) -> list[bytes]:
        """Extends seq.block_hashes to its first `num_full_blocks` full blocks."""
        bs = self.block_size
        while len(seq.block_hashes) < num_full_blocks:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if i else adapter_root_hash(seq.lora_id)
            salt = (
                ()
                if self.block_salt is None
                else self.block_salt(i * bs, (i + 1) * bs, seq.num_prompt_tokens)
            )
            seq.block_hashes.append(hash_block_tokens(parent, seq.token_ids[i * bs : (i + 1) * bs], salt))
        return seq.block_hashes[:num_full_blocks]

    def get_computed_blocks(self, seq: Sequence) -> tuple[list[KVCacheBlock], int]:
        """Longest cached prefix of a waiting sequence: (blocks, number of tokens they cover)."""
        if not self.enable_prefix_caching:
            return [], 0
        num_cacheable = min(seq.num_tokens - 1, seq.num_known_tokens)  # placeholders are not content
        if seq.num_prompt_logprobs_pending:  # logits from position len(seq.prompt_logprobs) on are needed
            num_cacheable = min(num_cacheable, len(seq.prompt_logprobs))
        blocks = []
        for block_hash in self._block_hashes(seq, num_cacheable // self.block_size):
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            blocks.append(block)
        self.prefix_cache_queries += seq.num_tokens
        self.prefix_cache_hits += len(blocks) * self.block_size
        return blocks, len(blocks) * self.block_size

    def allocate_slots(
        self, seq: Sequence, num_new_tokens: int, new_computed_blocks: Seq[KVCacheBlock] = ()
    ) -> bool:
        """Grows seq's block table to hold its computed tokens, `new_computed_blocks` (a prefix hit,
        only for a sequence being scheduled from waiting) and `num_new_tokens` more. False, with
        nothing else changed, when the pool cannot supply the blocks.

            | computed (seq.num_computed_tokens) | new_computed_blocks | num_new_tokens |
            |<------------------ fits in the returned block table -------------------->|
            |<- dead: before the window ->|  (sliding_window only; released first, even on False:
                                              no layer reads them again; dead hits are never taken)
        """
        blocks = self.seq_blocks.get(seq.seq_id)
        if blocks is not None and not new_computed_blocks and self.sliding_window is None:
            # a running sequence whose table already holds the new tokens (most decode steps)
            num_tokens = seq.num_computed_tokens + num_new_tokens
            if num_tokens <= len(blocks) * self.block_size:
                if self.enable_prefix_caching:
                    self._cache_full_blocks(seq, blocks, num_tokens // self.block_size)
                return True
        blocks = self.seq_blocks.setdefault(seq.seq_id, [])
        ids = self.seq_block_ids.setdefault(seq.seq_id, [])
        first_new_token = seq.num_computed_tokens + len(new_computed_blocks) * self.block_size
        num_dead = self._num_dead_blocks(first_new_token)
        self._release(seq, blocks, num_dead)
        dead_hits = max(0, min(num_dead - len(blocks), len(new_computed_blocks)))
        live_hits = new_computed_blocks[dead_hits:]
        num_tokens = first_new_token + num_new_tokens
        num_needed = -(-num_tokens // self.block_size) - len(blocks) - len(new_computed_blocks)
        num_evictable_hits = sum(1 for b in live_hits if b.ref_cnt == 0)  # hits sitting in the free queue
        if max(num_needed, 0) + num_evictable_hits > self.pool.num_free_blocks:
            if not blocks:
                del self.seq_blocks[seq.seq_id]
                del self.seq_block_ids[seq.seq_id]
            return False
        self.pool.touch(live_hits)
        blocks.extend([None] * dead_hits)
        blocks.extend(live_hits)
        ids.extend([RELEASED_BLOCK_ID] * dead_hits)
        ids.extend(b.block_id for b in live_hits)
        if dead_hits:
            self.num_released_blocks[seq.seq_id] = len(blocks) - len(live_hits)
        if num_needed > 0:
            new_blocks = self.pool.get_new_blocks(num_needed)
            blocks.extend(new_blocks)
            ids.extend(b.block_id for b in new_blocks)
        if self.enable_prefix_caching:
            self._cache_full_blocks(seq, blocks, num_tokens // self.block_size)
        return True

    def _cache_full_blocks(
        self, seq: Sequence, blocks: list[KVCacheBlock | None], num_full_blocks: int
    ) -> None:
        # a block holding a placeholder (async scheduling) is registered once its ids are known
        num_full_blocks = min(num_full_blocks, seq.num_known_tokens // self.block_size)
        start = self.num_cached_blocks.get(seq.seq_id, 0)
        if num_full_blocks <= start:
            return
        hashes = self._block_hashes(seq, num_full_blocks)
        for i in range(start, num_full_blocks):
            block = blocks[i]
            if block is not None:  # a released position: a dead prefix hit, registered already
                self.pool.cache_block(block, hashes[i])
        self.num_cached_blocks[seq.seq_id] = num_full_blocks

    def _release(self, seq: Sequence, blocks: list[KVCacheBlock | None], num_dead: int) -> None:
        """Frees the table's blocks before index num_dead (those not released yet), tail first like
        `free`, so a prefix chain's root outlives its suffixes in the cache."""
        start = self.num_released_blocks.get(seq.seq_id, 0)
        end = min(num_dead, len(blocks))
        if end <= start:
            return
        dead = [b for b in blocks[start:end] if b is not None]
        blocks[start:end] = [None] * (end - start)
        self.seq_block_ids[seq.seq_id][start:end] = [RELEASED_BLOCK_ID] * (end - start)
        self.num_released_blocks[seq.seq_id] = end
        self.pool.free_blocks(dead[::-1])

    def free(self, seq: Sequence) -> None:
        """Releases seq's blocks, tail first, so a shared prefix outlives its suffixes in the cache."""
        blocks = self.seq_blocks.pop(seq.seq_id, [])
        self.seq_block_ids.pop(seq.seq_id, None)
        self.num_cached_blocks.pop(seq.seq_id, None)
        self.num_released_blocks.pop(seq.seq_id, None)
        self.pool.free_blocks([b for b in reversed(blocks) if b is not None])

    def reset_prefix_cache(self) -> bool:
        """Drops every cached hash; only allowed when no sequence holds blocks."""
        if self.seq_blocks:
            return False
        self.pool.reset_prefix_cache()
        return True
