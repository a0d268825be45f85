"""CUDA graphs for decode steps.

At small batch a decode step is launch-bound: every layer issues about ten kernels (norms, GEMMs,
RoPE, KV write, attention, activation) and the CPU cannot queue them as fast as the GPU runs them.
Replaying a captured graph issues the whole forward as one launch.

One graph per batch size in `capture_sizes(max_num_seqs)`, captured once after the KV cache is
allocated, largest first, all in one memory pool (they never run at the same time). A step with n
decoding sequences replays the smallest captured size >= n: rows n.. are padding with slot -1 (the
KV write skips them) and seq_len 1 (attention reads one cached position; the output row is dropped).
Prefill and mixed steps, and batches above the largest size, run eagerly. Logits and sampling stay
outside the graph: they depend on which rows sample.

The graphs read static input buffers, so a step copies its inputs into them first. With
`capture=False` the same padded, static-buffer forward runs eagerly: that is how CPU tests check
the padding logic in the Triton interpreter.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch
from torch import nn

from lmforge.runtime.engine.attention import KernelAttentionMetadata


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_num_seqs, and max_num_seqs itself (vLLM's
    scheme: fine steps where padding would double the work, coarse ones where it costs little)."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be positive, got {max_num_seqs}")
    sizes = {s for s in (1, 2, 4, 8) if s <= max_num_seqs}
    sizes.update(range(16, max_num_seqs + 1, 16))
    sizes.add(max_num_seqs)
    return sorted(sizes)


def padded_size(num_seqs: int, sizes: Sequence[int]) -> int | None:
    """The smallest captured size holding num_seqs rows (sizes ascending); None: run eagerly."""
    i = bisect.bisect_left(sizes, num_seqs)
    return sizes[i] if i < len(sizes) else None


class DecodeGraphRunner:
    """Static input buffers + one captured decode forward per batch size."""

    def __init__(self, model: nn.Module, *, max_num_seqs: int, max_blocks_per_seq: int, device: torch.device):
        self.model = model
        self.sizes = capture_sizes(max_num_seqs)
        rows = self.sizes[-1]
        self.input_ids = torch.zeros(rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((rows,), -1, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(rows, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(rows, dtype=torch.int32, device=device)
        self.cu_seqlens_q = torch.arange(rows + 1, dtype=torch.int32, device=device)  # one token per row
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # size -> the graph's hidden-state output [size, hidden]

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def _forward(self, size: int) -> torch.Tensor:
        meta = KernelAttentionMetadata(
            slot_mapping=self.slot_mapping[:size], block_tables=self.block_tables[:size],
            seq_lens=self.seq_lens[:size], cu_seqlens_q=self.cu_seqlens_q[: size + 1], max_q_len=1, decode_only=True,
        )
        return self.model(self.input_ids[:size], self.positions[:size], meta)

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up (Triton compiles outside the capture), then capture every size, largest first so
        the shared pool is sized by the first graph."""
        pool = None
        for size in reversed(self.sizes):
            self._forward(size)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self._forward(size)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
            block_tables: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        """One decode step for n <= max_batch sequences -> hidden states [n, hidden].

        input_ids, positions, slot_mapping, seq_lens [n]; block_tables [n, w], w <= max_blocks_per_seq.
        """
        num_seqs, width = block_tables.shape
        size = padded_size(num_seqs, self.sizes)
        if size is None:
            raise ValueError(f"{num_seqs} sequences exceed the largest captured batch {self.max_batch}")
        self.input_ids[:num_seqs].copy_(input_ids)
        self.positions[:num_seqs].copy_(positions)
        self.slot_mapping[:num_seqs].copy_(slot_mapping)
        self.slot_mapping[num_seqs:size].fill_(-1)
        self.seq_lens[:num_seqs].copy_(seq_lens)
        self.seq_lens[num_seqs:size].fill_(1)
        self.block_tables[:num_seqs, :width].copy_(block_tables)
        graph = self.graphs.get(size)
        if graph is None:  # not captured (CPU tests): the same static, padded forward, eagerly
            return self._forward(size)[:num_seqs]
        graph.replay()
        return self.outputs[size][:num_seqs]
