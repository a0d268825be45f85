"""Random paged KV caches for the kernel tests and benchmarks: one builder instead of a copy each.

Each sequence's blocks are scattered over the pool in random order (as the block manager leaves
them after churn), so a kernel that ignores the block table cannot pass. Torch only.
"""

from __future__ import annotations

import math

import torch


def random_paged_cache(
    seq_lens: list[int],
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    int8: bool = False,
    spare_blocks: int = 0,
    pad_columns: int = 0,
):
    """-> (caches [k, v], scales [k, v] or [None, None], block_tables int32, seq_lens int32).

    caches [num_blocks, block_size, Hkv, D] in `dtype` (int8 codes with fp32 per-token-head scales
    when int8); `spare_blocks` unused blocks in the pool; block tables get `pad_columns` extra
    columns of block 0 (as the engine pads a batch to its longest table).
    """
    blocks_needed = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(blocks_needed) + spare_blocks
    order = torch.randperm(num_blocks)
    block_tables = torch.zeros(len(seq_lens), max(blocks_needed) + pad_columns, dtype=torch.int32)
    used = 0
    for b, n in enumerate(blocks_needed):
        block_tables[b, :n] = order[used : used + n]
        used += n
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    scales: list[torch.Tensor | None]
    if int8:
        caches = [torch.randint(-127, 128, shape, dtype=torch.int8, device=device) for _ in "kv"]
        scales = [torch.rand(shape[:3], device=device) * 0.02 + 0.005 for _ in "kv"]
    else:
        caches = [torch.randn(shape, dtype=dtype, device=device) for _ in "kv"]
        scales = [None, None]
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    return caches, scales, block_tables.to(device), seq_lens_t
